"""The worker's web server (Faust's, ``--web-port``, default 6066): the dashboard and its JSON API.

- ``GET /`` — the dashboard: runs page, run page (charts with alert markers), alerts page (feed,
  silences). Every run of the deployment, read from the compacted tables by :class:`DeploymentView`,
  whichever worker owns it. Static files (the vendored uPlot, the page's script) under ``/static/``.
- ``GET /lossguard/api/runs`` · ``/lossguard/api/runs/{run_id}`` · ``/lossguard/api/alerts?run=&severity=&status=``
  · ``/lossguard/api/silences`` — the dashboard's data, as JSON.
- ``POST /lossguard/api/runs/{run_id}/stop`` ``{"reason": ...}`` — writes a stop control event.
- ``POST /lossguard/api/silences`` ``{"run", "type", "severity", "for", "comment"}`` · ``POST
  /lossguard/api/silences/{id}/expire``.
- ``GET /metrics`` — Prometheus metrics (:mod:`stream_app.metrics`).
- ``GET /lossguard/runs/`` · ``/lossguard/runs/{run_id}/`` · ``/lossguard/stats/`` — JSON of this
  worker's own partitions and counters.
"""

from __future__ import annotations

import asyncio
import mimetypes
from importlib import resources
from typing import Any

import faust
from faust.web import View

from .aggregates import RunSummary

__all__ = ["register"]

_DASHBOARD = resources.files("stream_app").joinpath("dashboard")
_STATIC = {"app.js", "app.css", "charts.js", "vendor/uPlot.iife.min.js", "vendor/uPlot.min.css",
           "vendor/uPlot.LICENSE"}


def register(app: faust.App, run_summary: Any, counters: dict[str, Any], metrics: Any = None) -> None:
    """Add the dashboard, its API, ``/metrics`` (``metrics``: a :class:`~stream_app.metrics.WorkerMetrics`)
    and the per-worker JSON views to ``app``'s web server."""
    view: dict[str, Any] = {}

    if metrics is not None:
        metrics.watch(runs_tracked=lambda: sum(1 for _ in run_summary.keys()), lag=lambda: _consumer_lag(app))

        @app.page("/metrics")
        async def prometheus(web: Any, request: Any) -> Any:
            # text/plain is Prometheus' text format 0.0.4 (aiohttp takes no parameters in content_type)
            return web.bytes(metrics.exposition(), content_type="text/plain")

    def deployment() -> Any:
        """The deployment view, started on first use and after it stopped idle (this module is imported
        before the settings exist)."""
        if "view" not in view:
            from . import app as app_module
            from .deployment import DeploymentView
            from .sinks.silences import silences_topic

            s = app_module.settings
            view["settings"] = s
            view["view"] = DeploymentView(
                app_module._bootstrap, run_summary_changelog=s.changelog("run_summary"),
                alerts_topic=s.topic("alerts"), silences_topic=silences_topic(s.topic_prefix),
                control_topic=s.topic("control"))
        view["view"].touch()
        return view["view"]

    async def warm() -> Any:
        """The view, once its first pass over the topics is done (at most 3 s on a cold start)."""
        current = deployment()
        if not current.caught_up.is_set():
            await blocking(current.caught_up.wait, 3.0)
        return current

    async def blocking(fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def overviews() -> list[dict[str, Any]]:
        runs = [RunSummary.from_dict(state).overview() for _, state in run_summary.items() if state]
        return sorted(runs, key=lambda r: r["last_ts"] or 0, reverse=True)

    @app.page("/")
    async def dashboard(web: Any, request: Any) -> Any:
        return web.html(_DASHBOARD.joinpath("index.html").read_text(encoding="utf-8"))

    @app.page("/static/{name:.+}")
    async def static(web: Any, request: Any, name: str) -> Any:
        if name not in _STATIC:
            return web.json({"error": f"no static file {name}"}, status=404)
        content_type = mimetypes.guess_type(name)[0] or "text/plain"
        return web.bytes(_DASHBOARD.joinpath(name).read_bytes(), content_type=content_type,
                         headers={"Cache-Control": "max-age=300"})

    @app.page("/lossguard/api/runs")
    async def api_runs(web: Any, request: Any) -> Any:
        return web.json((await warm()).runs())

    @app.page("/lossguard/api/runs/{run_id}")
    async def api_run(web: Any, request: Any, run_id: str) -> Any:
        run = (await warm()).run(run_id)
        if run is None:
            return web.json({"error": f"unknown run {run_id}"}, status=404)
        return web.json(run)

    @app.page("/lossguard/api/runs/{run_id}/stop")
    class StopRun(View):
        async def post(self, request: Any, run_id: str) -> Any:
            from detectors.events import ControlEvent

            from .control_cli import send_control

            if (await warm()).run(run_id) is None:
                return self.json({"error": f"unknown run {run_id}"}, status=404)
            body = await _json_body(request)
            settings = view["settings"]
            event = ControlEvent(run_id=run_id, action="stop",
                                 reason=str(body.get("reason") or "stopped from the dashboard"))
            await blocking(send_control, event, deployment().bootstrap, settings.topic("control"),
                           settings.partitions)
            return self.json({"ok": True, "event": event.to_dict()})

    @app.page("/lossguard/api/alerts")
    async def api_alerts(web: Any, request: Any) -> Any:
        q = request.query
        severity = q.get("severity") or None
        if severity and severity not in ("low", "medium", "high", "critical"):
            return web.json({"error": f"severity: expected low, medium, high or critical, got {severity!r}"},
                            status=400)
        return web.json((await warm()).alerts(run=q.get("run") or None, severity=severity,
                                            status=q.get("status") or None))

    @app.page("/lossguard/api/silences")
    class Silences(View):
        async def get(self, request: Any) -> Any:
            return self.json((await warm()).silences())

        async def post(self, request: Any) -> Any:
            from detectors.config import ConfigError

            from .runs_cli import parse_duration
            from .sinks.silences import Silence, silences_topic, write_silence

            body = await _json_body(request)
            try:
                silence = Silence.new(duration_s=parse_duration(str(body.get("for") or "1h")),
                                      run_id=body.get("run") or None, alert_type=body.get("type") or None,
                                      severity=body.get("severity") or None, comment=str(body.get("comment") or ""))
            except ConfigError as exc:
                return self.json({"error": str(exc)}, status=400)
            await blocking(write_silence, deployment().bootstrap, silences_topic(view["settings"].topic_prefix),
                           silence)
            return self.json({"ok": True, "id": silence.id})

    @app.page("/lossguard/api/silences/{silence_id}/expire")
    class ExpireSilence(View):
        async def post(self, request: Any, silence_id: str) -> Any:
            import time

            from .sinks.silences import Silence, silences_topic, write_silence

            current = next((s for s in (await warm()).silences() if s.get("id") == silence_id), None)
            if current is None:
                return self.json({"error": f"no silence {silence_id}"}, status=404)
            fields = {k: v for k, v in current.items() if k != "active"}
            silence = Silence(**{**fields, "expires_at": time.time()})
            await blocking(write_silence, deployment().bootstrap, silences_topic(view["settings"].topic_prefix),
                           silence)
            return self.json({"ok": True})

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


def _consumer_lag(app: faust.App) -> list[tuple[str, int, int]]:
    """(topic, partition, records behind the end) for the partitions this worker reads."""
    consumer = app.consumer
    out = []
    for tp in sorted(consumer.assignment()):
        read = consumer._read_offset.get(tp)  # Faust keeps no public "position"; the last offset read
        try:
            end = consumer.highwater(tp)
        except Exception:  # noqa: BLE001 — not fetched yet
            continue
        if end is None:
            continue
        out.append((tp.topic, tp.partition, max(0, end - (read + 1 if read is not None else 0))))
    return out


async def _json_body(request: Any) -> dict[str, Any]:
    try:
        body = await request.json()
    except Exception:  # noqa: BLE001 — an empty or non-JSON body counts as no options
        return {}
    return body if isinstance(body, dict) else {}
