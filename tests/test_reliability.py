"""Faults against a real worker on the real broker: poison and fuzzed records, SIGTERM in every state.

The worker must survive any record (each bad one in the dead-letter topic with a reason, committed, never
retried), keep paging the good runs around them, and stop on SIGTERM within 10 s whatever it is doing.
"""

from __future__ import annotations

import json
import random
import signal
import time

import pytest

from detectors import MetricEvent
from tests.conftest import collect_alerts, read_topic
from tests.stream_fixtures import healthy, send
from tests.test_intake import POISON

pytestmark = pytest.mark.slow

SIGTERM_LIMIT_S = 10.0


def fuzzed_records(rng: random.Random, n: int) -> list[tuple[bytes | None, bytes | None]]:
    """Bounded, seeded fuzz: flipped bytes of a valid record, random bytes, hostile JSON shapes."""
    valid = MetricEvent("fz", 1, {"loss": 1.0}, ts=1.0).to_json()
    shapes = [b"null", b"[]", b"{}", b'"s"', b"1e999", b'{"steps":[]}', b'{"run_id":"fz","steps":[1,2]}',
              b'{"run_id":"fz","step":1,"metrics":{"loss":{"a":1}}}', b'{"run_id":7}', b"\x00" * 50]
    records = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            raw = bytearray(valid)
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            records.append((b"fz", bytes(raw)))
        elif kind == 1:
            records.append((rng.choice([None, b"fz", rng.randbytes(8)]), rng.randbytes(rng.randint(0, 300))))
        else:
            records.append((b"fz", rng.choice(shapes)))
    return records


def test_poison_and_fuzzed_records_neither_crash_nor_block_the_worker(topics, start_worker):
    from kafka import KafkaProducer

    worker = start_worker()
    rng = random.Random(14)
    bad: list[tuple[bytes | None, bytes | None]] = [(b"r", value) for value, _ in POISON.values()]
    bad.append((b"r", b"{" + b"x" * 900_000))  # a malformed record near the producer's 1 MiB limit
    bad.append((b"someone-else", MetricEvent("r", 1, {"loss": 1.0}, ts=1.0).to_json()))  # key ≠ run id
    bad += fuzzed_records(rng, 150)
    producer = KafkaProducer(bootstrap_servers=topics.bootstrap, max_request_size=2_000_000)
    good_runs = [f"good{i}" for i in range(6)]
    # good runs before, between and after the bad records: each ends in a NaN loss that must page
    send(topics.bootstrap, topics.name("metrics"), [e for r in good_runs[:2] for e in healthy(r, range(30))])
    for key, value in bad:
        producer.send(topics.name("metrics"), key=key, value=value)
    producer.flush()
    send(topics.bootstrap, topics.name("metrics"), [e for r in good_runs[2:] for e in healthy(r, range(30))], batch=10)
    nan = [MetricEvent(r, 30, {"loss": float("nan")}, ts=1_030.0) for r in good_runs]
    send(topics.bootstrap, topics.name("metrics"), nan)
    producer.close()

    alerts = collect_alerts(topics, lambda al: {a.run_id for a in al if a.alert_type == "nonfinite_metric"}
                            >= set(good_runs), timeout=90)
    assert {a.run_id for a in alerts if a.alert_type == "nonfinite_metric"} >= set(good_runs), worker.log()[-3000:]
    assert worker.proc.poll() is None, worker.log()[-3000:]
    fuzz_valid = sum(1 for a in alerts if a.run_id == "fz")  # a flipped byte may leave a valid record
    dead = [json.loads(r.value) for r in read_topic(topics.bootstrap, topics.name("dlq"), topics.partitions, 3)]
    assert all(d["reason"] and ":" in d["reason"] and len(d["sha256"]) == 64 for d in dead)
    reasons = {d["reason"].split(":", 1)[0] for d in dead}
    assert {"step", "ts", "metrics.loss", "event", "key", "steps[0].tags", "tags"} <= reasons, reasons
    # every poison record and the big one are there; most fuzzed ones too (a few flips stay valid events)
    assert len(dead) >= len(POISON) + 2 + 100 and len(dead) <= len(bad), (len(dead), fuzz_valid)
    big = [d for d in dead if d["size"] > 800_000]
    assert len(big) == 1 and big[0]["truncated"]
    assert "Traceback" not in worker.log()

    started = time.monotonic()
    worker.stop(signal.SIGTERM, timeout=30)
    assert worker.proc.returncode is not None and time.monotonic() - started < SIGTERM_LIMIT_S


def _sigterm_seconds(worker) -> float:
    started = time.monotonic()
    worker.stop(signal.SIGTERM, timeout=60)
    return time.monotonic() - started


def _flood(topics, runs: int, steps: int) -> None:
    send(topics.bootstrap, topics.name("metrics"), [e for r in range(runs) for e in healthy(f"f{r}", range(steps))])


@pytest.mark.parametrize("state", ["starting", "idle", "under load", "after a poison record"])
def test_sigterm_stops_a_worker_within_10_s(state, topics, start_worker):
    from kafka import KafkaProducer

    worker = start_worker()
    if state != "starting":
        send(topics.bootstrap, topics.name("metrics"), [MetricEvent("w", 1, {"loss": float("nan")}, ts=1.0)])
        assert collect_alerts(topics, lambda al: bool(al), timeout=60), worker.log()[-2000:]
    if state == "under load":
        _flood(topics, 20, 2000)
        time.sleep(0.5)
    if state == "after a poison record":
        producer = KafkaProducer(bootstrap_servers=topics.bootstrap)
        for value, _ in POISON.values():
            producer.send(topics.name("metrics"), key=b"r", value=value)
        producer.flush()
        producer.close()
        time.sleep(2)
    if state == "starting":
        time.sleep(1.5)
    assert worker.proc.poll() is None, worker.log()[-2000:]
    assert _sigterm_seconds(worker) < SIGTERM_LIMIT_S, worker.log()[-2000:]


def test_sigterm_stops_a_worker_whose_broker_went_away(tmp_path):
    from stream_app.broker import EmbeddedBroker, free_port
    from tests.conftest import Topics, WorkerProcess

    with EmbeddedBroker(port=free_port()) as broker:
        topics = Topics(broker.bootstrap)
        worker = WorkerProcess(topics, tmp_path / "data", tmp_path / "worker.log",
                               {"LOSSGUARD_MAX_BATCH_BYTES": "1", "LOSSGUARD_PRODUCER_LINGER_S": "0"})
        try:
            send(topics.bootstrap, topics.name("metrics"), [MetricEvent("w", 1, {"loss": float("nan")}, ts=1.0)])
            assert collect_alerts(topics, lambda al: bool(al), timeout=60), worker.log()[-2000:]
            broker.stop()
            time.sleep(3)
            assert worker.proc.poll() is None
            assert _sigterm_seconds(worker) < SIGTERM_LIMIT_S, worker.log()[-2000:]
        finally:
            worker.stop(signal.SIGKILL)


@pytest.mark.parametrize("transport", ["process", "thread"])
def test_an_outage_shorter_than_the_queue_loses_no_step(transport, tmp_path):
    """Real training through a broker stopped and restarted (the bundled broker keeps records in memory,
    so the steps before the outage are read before it stops, the rest from the new broker)."""
    torch = pytest.importorskip("torch")
    import producers
    from detectors.events import decode_metric_record
    from stream_app.broker import EmbeddedBroker, ensure_topics, free_port

    port = free_port()
    topic = f"outage-{transport}.metrics"

    def steps_on(bootstrap: str) -> list[int]:
        records = read_topic(bootstrap, topic, 1, timeout=1.5)
        return sorted(e.step for r in records for e in decode_metric_record(r.value) if "status" not in e.tags)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)

    def train(reporter, steps: range, delay: float) -> None:
        for step in steps:
            x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            reporter.log(step, loss=loss)
            time.sleep(delay)

    broker = EmbeddedBroker(port=port).start()
    try:
        ensure_topics(broker.bootstrap, [topic, f"outage-{transport}.control"], 1)
        reporter = producers.watch(f"outage-{transport}", model=model, optimizer=optimizer, bootstrap=broker.bootstrap,
                                   topic=topic, max_queue=2_000, transport=transport)
        train(reporter, range(0, 50), 0.0)
        assert reporter.flush(10.0)
        assert steps_on(broker.bootstrap) == list(range(50))
        broker.stop()
        started = time.perf_counter()
        train(reporter, range(50, 800), 0.005)  # ~4-6 s of training with the broker gone
        outage_s = time.perf_counter() - started
        broker = EmbeddedBroker(port=port).start()
        ensure_topics(broker.bootstrap, [topic, f"outage-{transport}.control"], 1)
        train(reporter, range(800, 850), 0.0)
        assert reporter.flush(60.0), reporter.stats
        stats = dict(reporter.stats)
        assert steps_on(broker.bootstrap) == list(range(50, 850)), stats
        assert stats["dropped"] == 0 and outage_s > 3, (stats, outage_s)
        reporter.close(timeout=10)
    finally:
        broker.stop()


def test_a_run_silent_across_a_restart_is_found_stalled_and_a_replayed_run_is_not(topics, start_worker, tmp_path):
    from tests.stream_fixtures import wait_runs

    config = tmp_path / "c.toml"
    config.write_text("[liveness]\nmin_seconds = 6.0\n[stream]\ntick_interval = 0.5\n")
    first = start_worker(config=config)
    now = time.time()
    live = [MetricEvent("live", s, {"loss": 1.0 - s / 100}, ts=now - 2.0 + s * 0.2) for s in range(10)]
    old = [MetricEvent("replayed", s, {"loss": 1.0 - s / 100}, ts=1_600_000_000.0 + s * 0.2) for s in range(10)]
    send(topics.bootstrap, topics.name("metrics"), live + old)
    runs = wait_runs(topics.bootstrap, topics.app_id, lambda r: all(
        k in r and r[k].events == 10 for k in ("live", "replayed")), timeout=60)
    assert runs["live"].events == 10, first.log()[-2000:]
    first.stop(signal.SIGKILL)  # before either run has been silent for min_seconds
    killed_at = time.time()
    second = start_worker(config=config)
    alerts = collect_alerts(topics, lambda al: any(a.alert_type == "stalled_run" for a in al), timeout=60)
    stalled = [a for a in alerts if a.alert_type == "stalled_run"]
    assert [a.run_id for a in stalled][:1] == ["live"], second.log()[-3000:]
    assert time.time() - killed_at > 4  # raised by the restarted worker, which never saw the run live
    time.sleep(3)  # several more ticks
    alerts = collect_alerts(topics, lambda al: False, timeout=3)
    assert not [a for a in alerts if a.run_id == "replayed"], [a.to_dict() for a in alerts if a.run_id == "replayed"]


def test_a_send_that_no_retry_mends_is_dropped_not_requeued_forever(topics):
    """A record over the producer's size limit (a permanent failure) is dropped and counted, with either
    transport; the events around it still arrive."""
    from detectors.events import decode_metric_record
    from producers.emitter import Emitter

    for transport in ("thread", "process"):
        emitter = Emitter(topics.name("metrics"), bootstrap=topics.bootstrap, transport=transport,
                          producer_config={"max_request_size": 100_000})
        run = f"big-{transport}"
        emitter.emit(run, MetricEvent(run, 1, {"loss": 1.0}, ts=1.0).to_json())
        assert emitter.flush(30)
        emitter.emit(run, b'{"pad":"' + b"x" * 200_000 + b'"}')
        emitter.emit(run, MetricEvent(run, 2, {"loss": 1.0}, ts=2.0).to_json())
        assert emitter.flush(30), emitter.stats.as_dict()
        stats = emitter.stats.as_dict()
        emitter.close(5)
        assert stats["dropped"] == 1 and stats["sent"] == 2 and stats["requeued"] == 0, (transport, stats)
    steps = sorted((e.run_id, e.step) for r in read_topic(topics.bootstrap, topics.name("metrics"), topics.partitions, 2)
                   for e in decode_metric_record(r.value))
    assert steps == [("big-process", 1), ("big-process", 2), ("big-thread", 1), ("big-thread", 2)]


def test_three_sigkills_mid_stream_lose_no_alert(topics, start_worker):
    """A worker SIGKILLed three times while runs stream in: every run's NaN still pages, under one alert id
    per run (a replayed record may publish an alert again — with the same id, which the sinks drop)."""
    runs = [f"k{i}" for i in range(30)]
    worker = start_worker()
    send(topics.bootstrap, topics.name("metrics"), [MetricEvent("warm", 0, {"loss": 1.0}, ts=1.0)])
    assert collect_alerts(topics, lambda al: False, timeout=1) == []
    for part in range(4):
        steps = range(part * 10, part * 10 + 10)
        send(topics.bootstrap, topics.name("metrics"), [e for r in runs for e in healthy(r, steps)], batch=5)
        if part < 3:
            time.sleep(1.0 + part)  # killed at different moments of its work
            worker.stop(signal.SIGKILL)
            worker = start_worker()
    send(topics.bootstrap, topics.name("metrics"), [MetricEvent(r, 40, {"loss": float("nan")}, ts=1_040.0) for r in runs])
    alerts = collect_alerts(topics, lambda al: {a.run_id for a in al if a.alert_type == "nonfinite_metric"} >= set(runs),
                            timeout=120)
    nan = [a for a in alerts if a.alert_type == "nonfinite_metric" and a.status == "firing"]
    assert {a.run_id for a in nan} == set(runs), worker.log()[-3000:]
    assert len({a.alert_id for a in nan}) == len(runs)
    assert all(a.step == 40 for a in nan)


def test_a_restarting_brokers_unknown_error_is_retried_by_either_transport():
    """The broker's "unknown server error" (-1), which a broker that has just restarted answers for a topic
    it has not loaded yet, is kept for a later round — in the training process and in the sender process
    alike — while an error no retry mends (a record over the size limit) stays permanent."""
    from kafka.errors import MessageSizeTooLargeError, UnknownError

    from producers.emitter import _passing
    from producers.sender_child import PERMANENT, _failure

    assert _passing(UnknownError()) and not _failure(UnknownError()).startswith(PERMANENT)
    assert not _passing(MessageSizeTooLargeError()) and _failure(MessageSizeTooLargeError()).startswith(PERMANENT)
    assert not _passing(ConnectionError(_failure(MessageSizeTooLargeError())))  # as the parent hears it
    assert _passing(ConnectionError(_failure(UnknownError())))
