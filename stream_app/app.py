"""The Faust app: metric records in, per-run state in changelog-backed tables, alerts out.

    lossguard.metrics (key = run_id) ──► agent ``detect`` ──► lossguard.alerts (key = run_id)
                                          │  │
                   run_summary table ◄────┘  └──► lossguard.dlq  (malformed/oversized, reason + bytes)
                   (step order, counts, tumbling-window aggregates + the detectors' state under "suite")

Every record of a run lands on one partition, so one worker owns a run's state; more workers with the
same app id split the partitions, and a worker that takes a partition over recovers the tables from
their changelog topics and carries on where the run was (warm-up not repeated, windows not lost).
A record is one metric event or a batch of steps of one run (:func:`detectors.events.decode_metric_record`); each step is
fed to the run's :class:`~detectors.RunDriver` — the same driver ``lossguard replay``, managed jobs and the
in-process API use — whose ledger, the run's :class:`~stream_app.aggregates.RunSummary`, classifies it
(new / resumed / duplicate / out of order); the new and resumed ones go through the run's
:class:`~detectors.DetectorSuite`. Alerts carry the run's ``source`` and ``tags`` in ``metadata`` so
routing can match on them; the stream-level alert policy
(dedup, cooldown, grouping, silences) runs in the sinks (:mod:`stream_app.sinks`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import OrderedDict
from typing import Any

import faust

from detectors import Alert, DetectorSuite, MetricEvent, RunDriver, SchemaError, load_detectors

from . import faust_fixes, recovery, web
from .aggregates import RunSummary
from .intake import dead_letter_value, read_record
from .metrics import WorkerMetrics
from .saved_state import STATE_CODEC, SavedState
from .settings import faust_credentials, load_settings

log = logging.getLogger("lossguard.worker")

load_detectors()  # users' detectors (LOSSGUARD_DETECTORS, entry points) before their config sections are read
settings = load_settings()
faust_fixes.install(settings.fetch_max_wait_ms)
_bootstrap = settings.bootstrap or f"127.0.0.1:{settings.broker_port}"
recovery.install(_bootstrap)


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
    broker=f"kafka://{_bootstrap}",
    broker_credentials=faust_credentials(settings.kafka),  # SASL/TLS from [kafka] / LOSSGUARD_KAFKA_*
    store=_store_url(),
    datadir=settings.data_dir,
    topic_partitions=settings.partitions,
    topic_replication_factor=1,
    broker_session_timeout=settings.session_timeout,
    broker_heartbeat_interval=settings.heartbeat_interval,
    broker_rebalance_timeout=max(10.0, settings.session_timeout * 3),
    consumer_auto_offset_reset="earliest",
    web_enabled=settings.web_enabled,
    web_port=settings.web_port,
    web_bind=settings.web_bind,
    table_cleanup_interval=30.0,
    producer_linger=settings.producer_linger_s,
    **({"producer_max_batch_size": settings.max_batch_bytes} if settings.max_batch_bytes else {}),
)

metrics_topic = app.topic(settings.topic("metrics"), key_serializer="raw", value_serializer="raw",
                          partitions=settings.partitions)
alerts_topic = app.topic(settings.topic("alerts"), key_serializer="raw", value_serializer="raw",
                         partitions=settings.partitions)
dlq_topic = app.topic(settings.topic("dlq"), key_serializer="raw", value_serializer="raw",
                      partitions=settings.partitions)

#: run_id → RunSummary.to_dict() (step order, counts, tumbling windows: read by runs/report/dashboard) with
#: the run's DetectorSuite.state_dict() under ``"suite"``; the changelog makes both survive restarts and
#: rebalances. One value, one changelog message per run per burst of records: each message costs the worker
#: ~0.25 ms on the send path (benchmarks/stream), and the summary and detector state of a run can no longer
#: be saved one without the other. (Untyped JSON values: with ``value_type=dict`` RocksDB cannot decode
#: them.) The codec writes the JSON Faust's ``json`` codec wrote, without encoding again the chart points a
#: save before this one encoded (stream_app.saved_state): a changelog written by either version reads back.
run_summary = app.Table("run_summary", default=None, partitions=settings.partitions, key_type=str)
# Table takes no serializer: the changelog sends and the store (built on first use) take this attribute;
# the changelog topic's own decoder stays Faust's ``json`` (the same JSON, decoded the same way)
assert run_summary._data is None, "the run_summary store was built before its codec was set"
run_summary.value_serializer = STATE_CODEC
#: the key of the detector state inside a ``run_summary`` value
SUITE_KEY = "suite"

#: live drivers (suite + summary) of recently active runs this worker owns (least recently used first);
#: rebuilt from the tables after a rebalance, bounded so 10k idle runs cost table state only
_drivers: OrderedDict[str, RunDriver] = OrderedDict()
counters: dict[str, Any] = {"records": 0, "events": 0, "alerts": 0, "dead_letters": 0, "duplicates": 0,
                            "out_of_order": 0, "resumes": 0, "dead_letter_reasons": {}}
#: Prometheus /metrics (stream_app.metrics): reads ``counters`` when scraped
worker_metrics = WorkerMetrics(counters)
#: fresh suites for new runs: the detector config is validated once per worker, not once per run
new_suite = DetectorSuite.factory(settings.detector_config)


@app.on_partitions_revoked.connect
async def _forget_drivers(_sender: Any, revoked: Any, **_kwargs: Any) -> None:
    _drivers.clear()


def driver_for(run_id: str) -> RunDriver:
    """The run's live driver (its suite, and its summary as the ledger), restored from the tables when
    not cached."""
    live = _drivers.get(run_id)
    if live is not None:
        _drivers.move_to_end(run_id)
        return live
    suite = new_suite()
    summary_state = run_summary.get(run_id)
    state = summary_state.get(SUITE_KEY) if summary_state else None
    if state:
        suite.load_state_dict(state)
    summary = (RunSummary.from_dict(summary_state) if summary_state
               else RunSummary(run_id, settings.window_s, settings.keep_windows))
    _drivers[run_id] = live = RunDriver(suite, ledger=summary)
    # a burst's runs stay until saved: fewer than 2 × take_records (one detector call past the limit)
    if len(_drivers) > max(settings.live_runs, 2 * settings.take_records):
        _drivers.popitem(last=False)
    return live


async def dead_letter(key: bytes | None, raw: bytes | None, reason: str) -> None:
    """Park a record on the dead-letter topic with its reason (never raises: the agent goes on)."""
    counters["dead_letters"] += 1
    field = reason.split(":", 1)[0][:100]
    counters["dead_letter_reasons"][field] = counters["dead_letter_reasons"].get(field, 0) + 1
    try:
        await dlq_topic.send(key=key[:1000] if key else key, value=dead_letter_value(key, raw, reason))
    except Exception:  # noqa: BLE001 — the dead-letter topic down or refusing: log, never stop the agent
        log.exception("could not dead-letter a record (%s)", reason[:200])


async def publish(alert: Alert) -> None:
    counters["alerts"] += 1
    worker_metrics.alert_published(alert)
    await alerts_topic.send(key=alert.run_id.encode(), value=alert.to_json())


#: records processed but not yet acked, and the runs whose state they changed (saved when acked); when the
#: burst began, and when the worker last had a record to work on (one came, or a save ended); ``busy`` while records are between the detectors and the
#: burst (a run's state is not saved then: it may hold steps of records whose alerts are not yet sent)
_burst: dict[str, Any] = {"stream": None, "pending": [], "unsaved": {}, "since": 0.0, "last": 0.0, "busy": False}
#: a burst is over once no record has come for this long (or the timer's own period, if shorter). Time the
#: worker spent saving is not a pause: counted as one, a save that held the loop this long ended the next
#: burst after a few records, whose save did the same (measured on a backlog of single events of 200 runs:
#: 11,000 saves for 20,000 records, against about 2,000 once saves are not pauses)
_PAUSE_S = 0.05
#: event-loop turns that Faust's consumer takes to hand the agent its next fetched record
_HANDOVER_YIELDS = 3
#: longest the detectors hold the event loop before they yield it
_TURN_S = 0.01
#: records a burst may hold unacked (and replayed after a crash) whatever its runs and its age
_MAX_PENDING = 10 * settings.take_records
#: steps of waiting records the detectors take in one go, of at most take_records runs (so a burst holds
#: fewer than 2 × take_records runs: the live drivers' bound). The more steps a run has waiting, the more
#: each detector call takes: a suite call costs ~50 µs for one step, ~7 µs a step for a batch of them
#: (200 runs sending single events from a backlog of 20,000: 4 × take_records took the worker's CPU per
#: event from 191–250 µs to 150–164 µs, and its state saves from ~1,400 to ~800 a backlog, in two pairs)
_TAKE_STEPS = 4 * settings.take_records
#: decoded records not yet through the detectors, by run (in their order)
_waiting: dict[str, list[tuple[faust.types.EventT, list[MetricEvent]]]] = {}


@app.agent(metrics_topic)
async def detect(stream: faust.StreamT) -> None:
    """A record goes through the detectors, and its alerts out, as soon as no other record is waiting
    behind it: a record alone is processed at once; records that queued up while the worker was busy are
    taken together (up to 4 × ``take_records`` steps of at most ``take_records`` runs), each run's steps through the detectors' batch paths in
    one call — what a record costs then falls as the load rises, so a queue does not grow. A run's state is
    saved, and the records acked, once per burst: once none are waiting and ``save_interval_s`` have passed
    since the burst began, or sooner when ``take_records`` runs wait to be saved (or ten times as many
    records to be acked). A save costs per run, not per record: a run that sends single events has one
    save per burst whatever its rate. A restarted worker replays from the last commit, never past a step
    whose state was not saved."""
    manual = _burst["stream"] = stream.noack()
    waiting = 0
    async for event in manual.events():
        _burst["last"] = time.monotonic()
        steps = await _decode(event)
        if steps is None:
            _add_to_burst(event)
        else:
            _waiting.setdefault(steps[0].run_id, []).append((event, steps))
            waiting += len(steps)
        if waiting >= _TAKE_STEPS or len(_waiting) >= settings.take_records or await _nothing_behind(manual.channel):
            waiting = 0
            await _detect_waiting()
        pending = _burst["pending"]
        if pending and (len(_burst["unsaved"]) >= settings.take_records or len(pending) >= _MAX_PENDING or (
                manual.channel.empty() and time.monotonic() - _burst["since"] >= settings.save_interval_s)):
            await _save_burst()


async def _nothing_behind(channel: Any) -> bool:
    """True once no record is waiting for the agent: none in its channel, and none that Faust's consumer
    has fetched and hands over a record at a time (it needs the event loop for each: yield to it)."""
    for _ in range(_HANDOVER_YIELDS):
        if not channel.empty():
            return False
        await asyncio.sleep(0)
    return channel.empty()


def _add_to_burst(event: faust.types.EventT) -> None:
    pending = _burst["pending"]
    _burst["last"] = now = time.monotonic()
    if not pending:
        _burst["since"] = now
    pending.append(event)


@app.timer(interval=min(_PAUSE_S, settings.save_interval_s))
async def _save_idle_burst() -> None:
    """The records before a pause are saved and acked here, within about 0.1 s: the table (what ``lossguard
    runs`` and the dashboard read) does not lag an alert by more."""
    now = time.monotonic()
    if _burst["pending"] and not _burst["busy"] and (
            now - _burst["last"] >= _PAUSE_S or now - _burst["since"] >= settings.save_interval_s):
        await _save_burst()


async def _save_burst() -> None:
    events, unsaved = _burst["pending"], _burst["unsaved"]
    _burst["pending"], _burst["unsaved"] = [], {}  # taken whole before the first await
    seen_at = time.time()
    for run_id, (last, driver) in unsaved.items():
        driver.ledger.seen_at = seen_at
        try:
            with faust_fixes.as_current(last):  # the table writes to the partition of the run's records
                run_summary[run_id] = _saved_value(driver)
        except Exception:  # noqa: BLE001 — unreachable for decoded records; if it happens, one run loses
            # its unsaved steps (restored from the table on its next record), the others go on
            log.exception("could not save the state of run %r", run_id[:200])
            counters["state_save_failures"] = counters.get("state_save_failures", 0) + 1
            _drivers.pop(run_id, None)
    for event in events:
        await _burst["stream"].ack(event)
    _burst["last"] = time.monotonic()


async def _decode(event: faust.types.EventT) -> list[MetricEvent] | None:
    """A record's steps (None: the record went to the dead-letter topic)."""
    counters["records"] += 1
    try:
        return read_record(event.key, event.value, settings.max_record_bytes)
    except SchemaError as exc:
        await dead_letter(event.key, event.value, str(exc))
        return None
    except Exception as exc:  # noqa: BLE001 — a decoder bug must not stop the agent either
        log.exception("a record could not be read")
        await dead_letter(event.key, event.value, f"event: unreadable ({type(exc).__name__}: {str(exc)[:200]})")
        return None


async def _detect_waiting() -> None:
    """The waiting records through the detectors, run by run, their alerts published, the records added
    to the burst."""
    _burst["busy"] = True
    turn = time.monotonic()
    try:
        while _waiting:
            if time.monotonic() - turn > _TURN_S:  # let the web server and Faust's own tasks run
                await asyncio.sleep(0)
                turn = time.monotonic()
            run_id, records = _waiting.popitem()
            steps = records[0][1] if len(records) == 1 else [step for _, rec in records for step in rec]
            try:
                alerts, driver = _process(steps)
                for alert in alerts:
                    await publish(alert)
            except Exception as exc:  # noqa: BLE001 — a detector bug must not stop the agent: park the records
                log.exception("records of run %r failed in the detectors", run_id[:200])
                for event, _ in records:
                    await dead_letter(event.key, event.value, f"processing: {type(exc).__name__}: {str(exc)[:500]}")
                    _add_to_burst(event)
                _drivers.pop(run_id, None)  # its live state may be half-updated: restore from the table
                continue
            for event, _ in records:
                worker_metrics.record_processed(event.message.timestamp)
                _add_to_burst(event)
            _burst["unsaved"][run_id] = (records[-1][0], driver)
    finally:
        _burst["busy"] = False


def process(events: list[MetricEvent]) -> list[Alert]:
    """One record's steps through the run's step-order check and detectors; saves the run's state (in a
    stream's iteration, to the partition of its current record)."""
    alerts, driver = _process(events)
    run_summary[events[0].run_id] = _saved_value(driver)
    return alerts


def _saved_value(driver: RunDriver) -> SavedState:
    value = driver.ledger.to_dict()
    value[SUITE_KEY] = driver.suite.state_dict()
    return SavedState(value, driver.ledger.history)


def _process(events: list[MetricEvent]) -> tuple[list[Alert], RunDriver]:
    """The steps of one run through its driver; the worker's counters follow its summary's."""
    driver = driver_for(events[0].run_id)
    summary = driver.ledger
    before = summary.events, summary.duplicates, summary.out_of_order, summary.resumes
    alerts = driver.feed(events)
    if summary.events - before[0] != len(events):  # some steps were not new
        counters["duplicates"] += summary.duplicates - before[1]
        counters["out_of_order"] += summary.out_of_order - before[2]
        counters["resumes"] += summary.resumes - before[3]
    counters["events"] += summary.events - before[0]
    return alerts, driver


@app.task
async def _freeze_startup_heap() -> None:
    """Move what the worker built to start (Faust, aiokafka, the detectors' modules: ~200k objects) out
    of the garbage collector's reach. Every full collection traverses every tracked object: with the
    startup heap in it each one held the event loop 0.1–0.4 s (measured; one every second or two under
    load), the worst tail of NaN → alert latency and a quarter of the worker's time on a backlog. The
    objects are still freed by reference counting when dropped; only a reference cycle among them would
    stay (there are none to collect now: the collection right before the freeze found them)."""
    gc.collect()
    gc.freeze()


@app.task
async def _quiet_debug_logging() -> None:
    """Faust's worker sets the root logger to DEBUG so that its start-up spinner (a log handler) turns on
    every log call; from then on each aiokafka/Faust debug call (several per record: every send logs)
    builds a log record that only the spinner sees. Put the root back at its handlers' level. A worker
    started with ``--loglevel debug`` keeps DEBUG (its console handler is at DEBUG)."""
    root = logging.getLogger()
    spinners = [h for h in root.handlers if type(h).__name__ == "SpinnerHandler"]
    others = [h for h in root.handlers if h not in spinners]
    level = min((h.level for h in others), default=logging.NOTSET)
    if spinners and root.level == logging.DEBUG and level > logging.DEBUG:
        for handler in spinners:
            root.removeHandler(handler)
        root.setLevel(level)


#: a run whose last step's timestamp was this far behind the worker's clock when it arrived is a replay
#: or a backfill of an old run: it is not watched for silence
REPLAY_LAG_S = 3600.0


def _watched_runs(now: float) -> list[RunDriver]:
    """The runs this worker owns that the tick checks: every live one, and every other run in the table
    that has been silent for the least a stall can be (after a restart or a rebalance no run is live)."""
    runs = list(_drivers.values())
    quiet_s = float(settings.detector_config.get("liveness", {}).get("min_seconds", 60.0)
                    if settings.detector_config else 60.0)
    for run_id, value in list(run_summary.items()):
        if run_id in _drivers or not isinstance(value, dict):
            continue
        seen_at, last_ts = value.get("seen_at"), value.get("last_ts")
        if seen_at is None or last_ts is None or now - seen_at <= quiet_s or seen_at - last_ts > REPLAY_LAG_S:
            continue
        liveness = ((value.get(SUITE_KEY) or {}).get("detectors") or {}).get("stalled_run") or {}
        if not liveness.get("finished"):  # a run that ended stays in the table, and out of memory
            runs.append(driver_for(run_id))
    return runs


def _check_silence(driver: RunDriver, now: float) -> list[Alert]:
    """The run's time-based alerts: its silence is how long ago the worker last saw it, carried over to
    the run's own clock (its last step's timestamp), so neither a replay's old timestamps nor a skewed
    producer clock reads as silence."""
    seen_at, last_ts = driver.ledger.seen_at, driver.ledger.last_ts
    if seen_at is None or last_ts is None or seen_at - last_ts > REPLAY_LAG_S:
        return []
    return driver.tick(last_ts + max(0.0, now - seen_at))


@app.timer(interval=settings.tick_interval)
async def tick() -> None:
    """Time-based checks (a run gone silent) for the runs this worker owns. Tables cannot be written
    outside a stream, so a tick's episode is saved with the run's next event; until then a restarted
    worker may raise the same alert again — with the same alert id, which the sinks drop."""
    now = time.time()
    try:
        runs = _watched_runs(now)
    except Exception:  # noqa: BLE001 — a table read failing (mid-rebalance): the next tick tries again
        log.exception("could not list the runs to check for silence")
        return
    for driver in runs:
        for alert in _check_silence(driver, now):
            await publish(alert)


web.register(app, run_summary, counters, worker_metrics)
