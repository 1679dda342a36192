"""The per-run summary report (``total_alerts``, ``by_category``, ``by_severity``, ``latest_alerts``)
and its HTML page. The JSONL sink keeps the summary next to each run's alert file; ``lossguard report``
builds both from the alert topic and the run's windowed aggregates.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Iterable
from typing import Any

from detectors import SEVERITIES, Alert

__all__ = ["summarize", "render_html"]


def summarize(run_id: str, alerts: Iterable[Alert], latest: int = 10) -> dict[str, Any]:
    """Counts over the run's *firing* alerts (a resolved alert closes one, it is not a new problem)."""
    seen: set[str] = set()
    firing: list[Alert] = []
    resolved: list[Alert] = []
    for alert in alerts:
        if alert.run_id != run_id or alert.alert_id in seen:
            continue
        seen.add(alert.alert_id)
        (firing if alert.status == "firing" else resolved).append(alert)
    by_severity = Counter(a.severity for a in firing)
    ordered = sorted(firing + resolved, key=lambda a: (a.step, a.ts))
    last_status = {a.alert_type: a.status for a in ordered}
    return {
        "run_id": run_id,
        "total_alerts": len(firing),
        "resolved": len(resolved),
        "by_category": dict(Counter(a.category for a in firing)),
        "by_severity": {sev: by_severity.get(sev, 0) for sev in reversed(SEVERITIES)},
        "by_type": dict(Counter(a.alert_type for a in firing)),
        "open": sorted(t for t, status in last_status.items() if status == "firing"),
        "latest_alerts": [a.to_dict() for a in ordered[-latest:]],
    }


def render_html(summary: dict[str, Any], run: dict[str, Any] | None = None) -> str:
    """A self-contained HTML page: the summary, the latest alerts, and the run's tumbling windows."""
    esc = html.escape
    sev = "".join(f"<li class='{k}'>{k}: {v}</li>" for k, v in summary["by_severity"].items())
    cats = "".join(f"<li>{esc(k)}: {v}</li>" for k, v in sorted(summary["by_category"].items()))
    rows = "".join(
        f"<tr class='{a['severity']}'><td>{a['step']}</td><td>{a['severity']}</td><td>{a['status']}</td>"
        f"<td>{esc(a['alert_type'])}</td><td>{esc(a['message'])}</td></tr>" for a in summary["latest_alerts"])
    windows = ""
    if run:
        names = sorted({m for w in run.get("windows", []) for m in w["metrics"]})
        head = "".join(f"<th>{esc(n)} (min/mean/max)</th>" for n in names)
        body = "".join(
            f"<tr><td>{w['start']:.0f}</td><td>{w['count']}</td><td>{w['alerts']}</td>"
            + "".join(f"<td>{_stats(w['metrics'].get(n))}</td>" for n in names) + "</tr>"
            for w in run.get("windows", []))
        windows = (f"<h2>Windows ({run.get('events', 0)} events, last step {run.get('last_step')}, "
                   f"{run.get('duplicates', 0)} duplicates, {run.get('out_of_order', 0)} late, "
                   f"{run.get('resumes', 0)} resumed)</h2><table><tr><th>start</th><th>events</th>"
                   f"<th>alerts</th>{head}</tr>{body}</table>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>lossguard — {esc(summary['run_id'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:3px 6px}}.critical{{color:#b00;font-weight:bold}}.high{{color:#d40}}</style></head><body>
<h1>Run {esc(summary['run_id'])}</h1><p>{summary['total_alerts']} alerts, {summary['resolved']} resolved;
open: {esc(', '.join(summary['open']) or 'none')}</p><h2>By severity</h2><ul>{sev}</ul>
<h2>By category</h2><ul>{cats}</ul><h2>Latest alerts</h2><table><tr><th>step</th><th>severity</th>
<th>status</th><th>type</th><th>message</th></tr>{rows}</table>{windows}</body></html>"""


def _stats(stats: dict[str, float] | None) -> str:
    if not stats:
        return ""
    return f"{stats['min']:.4g} / {stats['mean']:.4g} / {stats['max']:.4g}"
