"""The Faust app: metric events in, per-run detector state in a changelog-backed table, alerts out.

    lossguard.metrics (key = run_id) ──► agent ``detect`` ──► lossguard.alerts (key = run_id)
                                          │  │
                        run_state table ◄─┘  └──► lossguard.dlq  (malformed events, with the reason)

Every event of a run lands on one partition, so one worker owns a run's state; more workers with the
same app id split the partitions, and a worker that takes a partition over recovers the table from its
changelog topic and carries on where the run was. Settings come from :mod:`stream_app.settings`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faust

from detectors import Alert, DetectorSuite, SchemaError, decode_metric_event
from detectors.events import dumps

from . import faust_fixes
from .settings import load_settings

log = logging.getLogger("lossguard.worker")

settings = load_settings()
faust_fixes.install(settings.fetch_max_wait_ms)


def _store_url() -> str:
    if settings.store == "rocksdb":
        try:
            import rocksdict  # noqa: F401

            return "rocksdb://"
        except ImportError:
            log.warning("rocksdict is not installed; using the memory store with changelog recovery")
    return "memory://"


app = faust.App(
    settings.app_id,
    broker=f"kafka://{settings.bootstrap or f'127.0.0.1:{settings.broker_port}'}",
    store=_store_url(),
    datadir=settings.data_dir,
    topic_partitions=settings.partitions,
    topic_replication_factor=1,
    broker_session_timeout=settings.session_timeout,
    broker_heartbeat_interval=settings.heartbeat_interval,
    broker_rebalance_timeout=max(10.0, settings.session_timeout * 3),
    consumer_auto_offset_reset="earliest",
    recovery_consistency_check=False,  # Tansu under-reports end offsets (STACK_NOTES.md)
    web_enabled=settings.web_enabled,
    web_port=settings.web_port,
    web_bind="127.0.0.1",
    table_cleanup_interval=30.0,
)

metrics_topic = app.topic(settings.topic("metrics"), key_serializer="raw", value_serializer="raw",
                          partitions=settings.partitions)
alerts_topic = app.topic(settings.topic("alerts"), key_serializer="raw", value_serializer="raw",
                         partitions=settings.partitions)
dlq_topic = app.topic(settings.topic("dlq"), key_serializer="raw", value_serializer="raw",
                      partitions=settings.partitions)

#: run_id → DetectorSuite.state_dict(); the changelog makes it survive restarts and rebalances
run_state = app.Table("run_state", default=None, partitions=settings.partitions, key_type=str,
                      value_type=dict)

#: live suites of the runs this worker owns; rebuilt from ``run_state`` after a rebalance
_suites: dict[str, DetectorSuite] = {}
counters = {"events": 0, "alerts": 0, "dead_letters": 0}


@app.on_partitions_revoked.connect
async def _forget_suites(_sender: Any, revoked: Any, **_kwargs: Any) -> None:
    _suites.clear()


def suite_for(run_id: str) -> DetectorSuite:
    suite = _suites.get(run_id)
    if suite is None:
        suite = DetectorSuite(settings.detector_config)
        state = run_state.get(run_id)
        if state:
            suite.load_state_dict(state)
        _suites[run_id] = suite
    return suite


async def dead_letter(key: bytes | None, raw: bytes, reason: str) -> None:
    counters["dead_letters"] += 1
    record = {"reason": reason, "ts": time.time(), "key": (key or b"").decode("utf-8", "replace"),
              "original": raw.decode("utf-8", "replace")}
    await dlq_topic.send(key=key, value=dumps(record))


async def publish(alert: Alert) -> None:
    counters["alerts"] += 1
    await alerts_topic.send(key=alert.run_id.encode(), value=alert.to_json())


@app.agent(metrics_topic)
async def detect(stream: faust.StreamT) -> None:
    async for key, raw in stream.items():
        counters["events"] += 1
        try:
            event = decode_metric_event(raw)
        except SchemaError as exc:
            await dead_letter(key, raw, str(exc))
            continue
        suite = suite_for(event.run_id)
        for alert in suite.update(event):
            await publish(alert)
        run_state[event.run_id] = suite.state_dict()
