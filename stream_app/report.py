"""The per-run summary report (``total_alerts``, ``by_category``, ``by_severity``, ``latest_alerts``,
and every alert ``episode``) and its HTML page. The JSONL sink keeps the summary next to each run's
alert file; ``lossguard report`` builds both from the alert topic and the run's ``run_summary`` value.

The HTML page is one self-contained file that opens offline: the vendored chart library (uPlot) and
the charts' script are inlined, the run's downsampled history and its alert episodes are inlined as
JSON, and the charts draw every episode on the curves (see ``dashboard/charts.js``).
"""

from __future__ import annotations

import html
import json
import time
from collections import Counter
from collections.abc import Iterable
from importlib import resources
from typing import Any

from detectors import SEVERITIES, Alert, severity_rank

__all__ = ["episodes", "render_html", "summarize"]


def summarize(run_id: str, alerts: Iterable[Alert], latest: int = 10) -> dict[str, Any]:
    """Counts over the run's *firing* alerts (a resolved alert closes one, it is not a new problem),
    the ``latest`` alert events, and every episode (most severe first)."""
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
        "episodes": episodes(ordered),
    }


def episodes(alerts: Iterable[Alert]) -> list[dict[str, Any]]:
    """Alerts grouped by episode (one detector's one alert type from the step the problem began),
    most severe first, then earliest: ``start``/``end`` steps (``end`` is the resolving step, None while
    open), the worst severity, the first message, and every firing alert of the episode."""
    groups: dict[tuple[str, str, int], dict[str, Any]] = {}
    for alert in sorted(alerts, key=lambda a: (a.step, a.ts)):
        key = (alert.detector, alert.alert_type, int(alert.metadata.get("episode_step", alert.step)))
        ep = groups.setdefault(key, {"detector": alert.detector, "alert_type": alert.alert_type,
                                     "category": alert.category, "start": key[2], "end": None,
                                     "severity": alert.severity, "message": alert.message, "open": True,
                                     "first_ts": alert.ts, "alerts": []})
        if alert.status == "resolved":
            ep["end"], ep["open"] = alert.step, False
            continue
        if severity_rank(alert.severity) > severity_rank(ep["severity"]):
            ep["severity"], ep["message"] = alert.severity, alert.message
        ep["alerts"].append(alert.to_dict())
    return sorted(groups.values(), key=lambda e: (-severity_rank(e["severity"]), e["start"]))


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))


def _asset(name: str) -> str:
    return resources.files("stream_app").joinpath("dashboard", name).read_text(encoding="utf-8")


def _inline_json(value: Any) -> str:
    """JSON safe inside a <script> element (no ``</script>`` from a message can close it)."""
    return json.dumps(value).replace("<", "\\u003c")


def render_html(summary: dict[str, Any], run: dict[str, Any] | None = None,
                detector_config: dict[str, Any] | None = None) -> str:
    """The self-contained HTML report: charts with alert markers, every episode, the summary JSON,
    the run's windows and the detector configuration."""
    esc = html.escape
    run = run or {}
    eps = summary.get("episodes", [])
    sev = " · ".join(f"<span class='{k}'>{v} {k}</span>" for k, v in summary["by_severity"].items())
    ep_rows = "".join(
        f"<tr class='{e['severity']}'><td>{e['severity']}</td><td>{esc(e['alert_type'])}</td>"
        f"<td>{e['start']}</td><td>{'open' if e['open'] else e['end']}</td><td>{len(e['alerts'])}</td>"
        f"<td>{_when(e['first_ts'])}</td><td>{esc(e['message'])}</td></tr>" for e in eps)
    alert_rows = "".join(
        f"<tr class='{a['severity']}'><td>{a['step']}</td><td>{_when(a['ts'])}</td><td>{a['severity']}</td>"
        f"<td>{esc(a['alert_type'])}</td><td>{esc(a['detector'])}</td><td>{esc(a['message'])}</td></tr>"
        for e in eps for a in e["alerts"])
    windows = ""
    if run.get("windows"):
        names = sorted({m for w in run["windows"] for m in w["metrics"]})
        head = "".join(f"<th>{esc(n)} (min / mean / max)</th>" for n in names)
        body = "".join(
            f"<tr><td>{_when(w['start'])}</td><td>{w['count']}</td><td>{w['alerts']}</td>"
            + "".join(f"<td>{_stats(w['metrics'].get(n))}</td>" for n in names) + "</tr>"
            for w in run["windows"])
        windows = (f"<h2>Recent windows</h2><table><tr><th>window start</th><th>events</th><th>alerts</th>"
                   f"{head}</tr>{body}</table>")
    tags = ", ".join(f"{esc(k)}={esc(v)}" for k, v in (run.get("tags") or {}).items()) or "none"
    data = {"history": run.get("history") or {}, "episodes": [{k: v for k, v in e.items() if k != "alerts"}
                                                              for e in eps], "last_step": run.get("last_step")}
    summary_json = {k: v for k, v in summary.items() if k != "episodes"}
    config = (f"<h2>Detector configuration</h2><p class='note'>as loaded by the command that wrote this report "
              f"(--config / LOSSGUARD_CONFIG)</p><pre>{esc(json.dumps(detector_config, indent=2))}</pre>"
              if detector_config else "")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>lossguard — {esc(summary['run_id'])}</title>
<style>{_asset('vendor/uPlot.min.css')}
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}}
.critical{{color:#c62828;font-weight:bold}}.high{{color:#ef6c00}}.medium{{color:#a07800}}.low{{color:#1e88e5}}
.lg-chart{{position:relative;margin:1em 0}}.lg-tip{{display:none;position:absolute;top:2em;right:1em;max-width:40em;
background:#fff;border:2px solid #999;padding:4px 8px;font-size:13px;z-index:10}}.note{{color:#777;font-size:90%}}
pre{{background:#f6f6f6;padding:1em;overflow:auto;max-height:30em}}</style></head><body>
<h1>Run {esc(summary['run_id'])}</h1>
<p>source {esc(run.get('source') or '-')} · tags {tags} · last step {run.get('last_step', '-')} ·
{run.get('events', 0)} events · first seen {_when(run.get('first_ts'))} · last seen {_when(run.get('last_ts'))}</p>
<p>{summary['total_alerts']} alerts ({sev}), {summary['resolved']} resolved; open:
{esc(', '.join(summary['open']) or 'none')}</p>
<div id="charts"></div>
<h2>Alert episodes, most severe first</h2>
<table><tr><th>severity</th><th>type</th><th>from step</th><th>to step</th><th>alerts</th><th>first fired</th>
<th>message</th></tr>{ep_rows}</table>
<h2>Every firing alert, by episode</h2>
<table><tr><th>step</th><th>time</th><th>severity</th><th>type</th><th>detector</th><th>message</th></tr>{alert_rows}</table>
{windows}
<h2>Summary</h2><pre>{esc(json.dumps(summary_json, indent=2))}</pre>
{config}
<script>{_asset('vendor/uPlot.iife.min.js')}</script>
<script>{_asset('charts.js')}</script>
<script>const LG = {_inline_json(data)};
lgDrawCharts(document.getElementById("charts"), LG.history, LG.episodes, LG.last_step);</script>
</body></html>"""


def _stats(stats: dict[str, float] | None) -> str:
    if not stats:
        return ""
    return f"{stats['min']:.4g} / {stats['mean']:.4g} / {stats['max']:.4g}"
