"""The whole deployment as one worker's dashboard shows it: every run, not only this worker's partitions.

A worker owns some partitions of ``run_summary``; the dashboard must show them all. :class:`DeploymentView`
reads, on a background thread, every partition of the ``run_summary`` changelog (the latest summary of
each run, chart history included), the alert topic (each run's latest alerts, bounded), the silences
topic and the control topic (stop requests), from their beginning, and then follows them. It is a plain
Kafka consumer without a group, so every worker's dashboard sees the same deployment.

It costs the worker only while someone looks: the web views start it on first use and it stops after
:data:`IDLE_STOP_S` without a request; a run's table value is kept as the bytes read and decoded only
when a page asks for it (again only once it changed).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import threading
import time
from collections import deque
from typing import Any

import orjson

from detectors import SEVERITIES, Alert, decode_alert, severity_rank
from detectors.events import decode_control_event
from producers.kafka_security import client_config

from .aggregates import RunSummary
from .report import episodes

__all__ = ["DeploymentView", "run_status"]

log = logging.getLogger("lossguard.deployment")

#: a run with no step for this long (event time vs. now) is shown as finished
LIVE_WINDOW_S = 120.0
#: alert events kept per run (the run page's markers and timeline)
ALERTS_PER_RUN = 1000
SPARKLINE_POINTS = 60
#: the view stops reading after this long without a request (and starts again on the next one)
IDLE_STOP_S = 600.0


def run_status(last_ts: float | None, stop_requested: bool, tags: dict[str, str] | None = None,
               now: float | None = None) -> str:
    """``stopped`` (a stop was requested), ``finished`` (the reporter's last word, tag ``status=finished``,
    or no step for two minutes) or ``live``."""
    if stop_requested:
        return "stopped"
    if (tags or {}).get("status") == "finished":
        return "finished"
    if last_ts is not None and (now or time.time()) - last_ts < LIVE_WINDOW_S:
        return "live"
    return "finished"


class DeploymentView:
    def __init__(self, bootstrap: str, *, run_summary_changelog: str, alerts_topic: str, silences_topic: str,
                 control_topic: str):
        self.bootstrap = bootstrap
        self.topics = {"runs": run_summary_changelog, "alerts": alerts_topic, "silences": silences_topic,
                       "control": control_topic}
        self._lock = threading.Lock()
        #: run → its latest table value as read, and the summary decoded from it (on demand)
        self._raw: dict[str, bytes] = {}
        self._runs: dict[str, RunSummary] = {}
        self._alerts: dict[str, deque[Alert]] = {}
        self._feed: deque[Alert] = deque(maxlen=2000)
        self._silences: dict[str, dict[str, Any]] = {}
        self._stops: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.caught_up = threading.Event()
        self._last_used = time.monotonic()

    # -- reading -------------------------------------------------------------------------------------------
    def start(self) -> DeploymentView:
        self._thread = threading.Thread(target=self._follow, name="lossguard-deployment-view", daemon=True)
        self._thread.start()
        return self

    def touch(self, wait_s: float = 0.0) -> None:
        """A request came: (re)start reading if stopped, and wait up to ``wait_s`` for the first pass."""
        self._last_used = time.monotonic()
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                self._raw.clear()
                self._runs.clear()
                self._alerts.clear()
                self._feed.clear()
                self._silences.clear()
                self._stops.clear()
            self.caught_up.clear()
            self._stop.clear()
            self.start()
        if wait_s:
            self.caught_up.wait(wait_s)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _follow(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        while not self._stop.is_set():
            try:
                consumer = KafkaConsumer(bootstrap_servers=self.bootstrap.split(","), **client_config(),
                                         group_id=None, enable_auto_commit=False, fetch_max_wait_ms=200)
            except Exception as exc:  # noqa: BLE001 — broker not up yet: try again
                log.warning("dashboard: cannot reach %s (%s); retrying", self.bootstrap, exc)
                self._stop.wait(2.0)
                continue
            try:
                assigned: set[TopicPartition] = set()
                next_check = 0.0
                while not self._stop.is_set():
                    if time.monotonic() - self._last_used > IDLE_STOP_S:
                        log.info("dashboard: no request for %.0f s; stopped reading the deployment", IDLE_STOP_S)
                        return
                    if time.monotonic() >= next_check:  # topics appear as workers and commands create them
                        existing = consumer.topics()
                        wanted = {TopicPartition(t, p) for t in self.topics.values() if t in existing
                                  for p in consumer.partitions_for_topic(t) or ()}
                        if wanted - assigned:
                            new = wanted - assigned
                            assigned |= new
                            positions = {tp: consumer.position(tp) for tp in assigned - new}
                            consumer.assign(sorted(assigned))
                            consumer.seek_to_beginning(*new)
                            for tp, offset in positions.items():
                                consumer.seek(tp, offset)
                        next_check = time.monotonic() + 5.0
                    batch = consumer.poll(timeout_ms=250)
                    for tp, records in batch.items():
                        self._apply(tp.topic, records)
                    if not batch and assigned:
                        self.caught_up.set()
            except Exception:  # noqa: BLE001 — keep the dashboard alive; reconnect
                log.exception("dashboard: reading the deployment failed; reconnecting")
                self._stop.wait(2.0)
            finally:
                consumer.close()

    def _apply(self, topic: str, records: list[Any]) -> None:
        kind = next(k for k, t in self.topics.items() if t == topic)
        with self._lock:
            for record in records:
                try:
                    getattr(self, f"_apply_{kind}")(record)
                except (ValueError, KeyError, TypeError) as exc:
                    log.debug("dashboard: skipped a record of %s at %s (%s)", topic, record.offset, exc)

    def _apply_runs(self, record: Any) -> None:
        run_id = json.loads(record.key)
        self._runs.pop(run_id, None)
        if record.value is None:
            self._raw.pop(run_id, None)
        else:
            self._raw[run_id] = record.value

    def _summary(self, run_id: str) -> RunSummary | None:
        """The run's summary, decoded from its latest table value on first use (call with the lock)."""
        run = self._runs.get(run_id)
        if run is None and run_id in self._raw:
            run = self._runs[run_id] = RunSummary.from_dict(orjson.loads(self._raw[run_id]))
        return run

    def _apply_alerts(self, record: Any) -> None:
        alert = decode_alert(record.value)
        self._alerts.setdefault(alert.run_id, deque(maxlen=ALERTS_PER_RUN)).append(alert)
        self._feed.append(alert)

    def _apply_silences(self, record: Any) -> None:
        key = record.key.decode()
        if record.value is None:
            self._silences.pop(key, None)
        else:
            self._silences[key] = json.loads(record.value)

    def _apply_control(self, record: Any) -> None:
        event = decode_control_event(record.value)
        if event.action == "stop":
            self._stops[event.run_id] = {"reason": event.reason, "alert_id": event.alert_id}
        else:
            self._stops.pop(event.run_id, None)

    # -- views -----------------------------------------------------------------------------------------------
    def runs(self) -> list[dict[str, Any]]:
        """One row per run: status, health (worst open alert), open alerts by severity, latest message,
        a loss sparkline."""
        now = time.time()
        with self._lock:
            items = [(self._summary(run_id), list(self._alerts.get(run_id, ())), run_id in self._stops)
                     for run_id in self._raw]
        rows = []
        for run, alerts, stopped in items:
            eps = episodes(alerts)
            open_eps = [e for e in eps if e["open"]]
            # the message that explains the health colour: the newest alert of the worst open episode
            worst = max(open_eps, key=lambda e: (severity_rank(e["severity"]), e["alerts"][-1]["step"]), default=None)
            latest = worst["alerts"][-1] if worst else max(
                (a.to_dict() for a in alerts), key=lambda a: (a["step"], a["ts"]), default=None)
            loss = run.history.series.get("loss") or next(iter(run.history.series.values()), [])
            stride = max(1, len(loss) // SPARKLINE_POINTS)
            rows.append({
                **run.overview(), "status": run_status(run.last_ts, stopped, run.tags, now),
                "age_s": None if run.last_ts is None else now - run.last_ts,
                "health": max((e["severity"] for e in open_eps), key=severity_rank, default="ok"),
                "open_alerts": {sev: sum(e["severity"] == sev for e in open_eps) for sev in reversed(SEVERITIES)},
                "latest_alert": latest,
                "sparkline": loss[::stride],
            })
        return sorted(rows, key=lambda r: r["last_ts"] or 0, reverse=True)

    def run(self, run_id: str) -> dict[str, Any] | None:
        with self._lock:
            run = self._summary(run_id)
            alerts = list(self._alerts.get(run_id, ()))
            stop = self._stops.get(run_id)
        if run is None:
            return None
        return {**run.overview(), "first_ts": run.first_ts, "status": run_status(run.last_ts, stop is not None, run.tags),
                "stop_request": stop, "history": run.history.to_dict(), "windows": run.windows,
                "episodes": episodes(alerts), "alerts": [a.to_dict() for a in alerts]}

    def alerts(self, run: str | None = None, severity: str | None = None, status: str | None = None,
               limit: int = 500) -> list[dict[str, Any]]:
        """The feed, newest first, filtered by run glob, minimum severity and status."""
        floor = severity_rank(severity) if severity else 0
        with self._lock:
            feed = list(self._feed)
        out = [a.to_dict() for a in reversed(feed)
               if a.rank >= floor and (not run or fnmatch.fnmatchcase(a.run_id, run))
               and (not status or a.status == status)]
        return out[:limit]

    def silences(self) -> list[dict[str, Any]]:
        now = time.time()
        with self._lock:
            values = list(self._silences.values())
        return sorted(({**s, "active": s.get("expires_at", 0) > now} for s in values),
                      key=lambda s: s.get("created_at", 0), reverse=True)
