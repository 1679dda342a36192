"""The worker's small web view, on Faust's own web server (``--web-port``, default 6066).

- ``GET /lossguard/runs/``  — JSON: the runs this worker owns (last step, events, alerts by severity)
- ``GET /lossguard/runs/{run_id}/`` — JSON: one run's summary with its tumbling windows
- ``GET /lossguard/stats/`` — JSON: the worker's counters (records, events, dead letters by reason …)
- ``GET /lossguard/``       — a minimal HTML dashboard over the same data, refreshing itself

Each worker shows the partitions it owns; ``lossguard runs`` reads every partition from the changelog.
"""

from __future__ import annotations

import html
from typing import Any

import faust

from .aggregates import RunSummary

__all__ = ["register", "runs_table_html"]


def runs_table_html(runs: list[dict[str, Any]]) -> str:
    """An HTML table of run overviews (also used by the report)."""
    rows = "".join(
        f"<tr><td>{html.escape(r['run_id'])}</td><td>{r['last_step']}</td><td>{r['events']}</td>"
        + "".join(f"<td class='{sev}'>{r['alerts'][sev]}</td>" for sev in ("critical", "high", "medium", "low"))
        + f"<td>{r['duplicates']}/{r['out_of_order']}/{r['resumes']}</td></tr>"
        for r in runs)
    return ("<table><tr><th>run</th><th>last step</th><th>events</th><th>critical</th><th>high</th>"
            f"<th>medium</th><th>low</th><th>dup/late/resumed</th></tr>{rows}</table>")


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>lossguard</title><style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
.critical{{color:#b00;font-weight:bold}}.high{{color:#d40}}</style></head><body>
<h1>lossguard — runs on this worker</h1><p>{stats}</p>{table}</body></html>"""


def register(app: faust.App, run_summary: Any, counters: dict[str, Any]) -> None:
    """Add the lossguard pages to ``app``'s web server."""

    def overviews() -> list[dict[str, Any]]:
        runs = [RunSummary.from_dict(state).overview() for _, state in run_summary.items() if state]
        return sorted(runs, key=lambda r: r["last_ts"] or 0, reverse=True)

    @app.page("/lossguard/runs/")
    async def runs(web: Any, request: Any) -> Any:
        return web.json(overviews())

    @app.page("/lossguard/runs/{run_id}/")
    async def run(web: Any, request: Any, run_id: str) -> Any:
        state = run_summary.get(run_id)
        if not state:
            return web.json({"error": f"run {run_id} is not on this worker"}, status=404)
        summary = RunSummary.from_dict(state)
        return web.json({**summary.overview(), "windows": summary.windows})

    @app.page("/lossguard/stats/")
    async def stats(web: Any, request: Any) -> Any:
        return web.json(counters)

    @app.page("/lossguard/")
    async def dashboard(web: Any, request: Any) -> Any:
        text = ", ".join(f"{k}: {v}" for k, v in counters.items() if not isinstance(v, dict))
        return web.html(_PAGE.format(stats=html.escape(text), table=runs_table_html(overviews())))
