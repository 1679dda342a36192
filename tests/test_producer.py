"""The plain-PyTorch producer through a real broker: what ``watch()`` adds, stop requests from the CLI,
a broker that is absent or dies mid-run, fork safety, rank filtering, and no Faust in producers."""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import producers  # noqa: E402
from detectors.events import decode_control_event, decode_metric_record  # noqa: E402
from stream_app.broker import EmbeddedBroker, ensure_topics, free_port  # noqa: E402
from tests.conftest import ROOT, read_topic  # noqa: E402

torch.set_num_threads(1)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def _train(reporter, model, optimizer, steps: int, clip: float | None = None, delay: float = 0.0, **log_kw):
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x, y = torch.randn(8, 16, generator=g) * 5, torch.randint(0, 4, (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if clip is not None:
            reporter.clip_grad_norm_(clip)
        optimizer.step()
        reporter.log(step, loss=loss, batch_size=8, **log_kw)
        if reporter.should_stop:
            return step
        if delay:
            time.sleep(delay)
    return steps - 1


def _events(topics, run_id: str, closing: bool = False):
    """The run's step events (and, with ``closing``, the ``status=finished`` event close() sends last)."""
    records = read_topic(topics.bootstrap, topics.name("metrics"), topics.partitions, timeout=1.0)
    events = [e for r in records for e in decode_metric_record(r.value) if e.run_id == run_id]
    return events if closing else [e for e in events if e.tags.get("status") != "finished"]


def _watch(topics, run_id: str, model=None, optimizer=None, **kw):
    return producers.watch(run_id, model=model, optimizer=optimizer, bootstrap=topics.bootstrap,
                           topic=topics.name("metrics"), **kw)


def test_watch_adds_grad_norm_lr_per_group_timing_memory_and_summaries(topics):
    model = _model()
    optimizer = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.01}],
                                lr=0.1)
    reporter = _watch(topics, "torch-1", model, optimizer, tags={"model": "mlp", "dataset": "noise"}, attempt=2)
    _train(reporter, model, optimizer, 10, clip=0.01, rewards=torch.linspace(-1, 1, 101),
           predictions=[0.9] * 10, labels=[1] * 5 + [0] * 5)
    val_due = producers.every(seconds=0.05)
    for step in range(10, 16):  # time-based validation: the val metric flows like any other
        time.sleep(0.03)
        if val_due():
            reporter.log(step, val_loss=1.5)
    reporter.close()

    events = _events(topics, "torch-1")
    train = [e for e in events if "loss" in e.metrics]
    assert [e.step for e in train] == list(range(10))
    m = train[3].metrics
    assert m["lr"] == 0.1 and m["lr/group1"] == 0.01 and m["batch_size"] == 8
    assert m["grad_norm"] > 0.1, "the norm from before clip_grad_norm_(0.01)"
    assert m["step_time"] > 0 and m["rss"] > 1e6 and math.isfinite(m["loss"])
    assert m["reward_mean"] == pytest.approx(0.0, abs=1e-9) and m["reward_p95"] == pytest.approx(0.9)
    assert m["calibration_bin9"] == 1.0 and m["ece"] == pytest.approx(0.4) and m["brier"] == pytest.approx(0.41)
    assert train[0].tags == {"host": train[0].tags["host"], "rank": "0", "attempt": "2", "model": "mlp",
                             "dataset": "noise"}
    assert any("val_loss" in e.metrics for e in events)


@pytest.mark.parametrize("layers", [1, 40])
def test_grad_norm_hook_without_clipping_matches_torch(topics, layers):
    # 1 layer: the norms are read on the training thread; 40 (over 64 tensors): added up on the sender thread
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(layers - 1)], _model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reporter = _watch(topics, "torch-norm", model, optimizer, listen=False)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    optimizer.step()
    reporter.log(0, loss=loss)
    reporter.close()
    (event,) = _events(topics, "torch-norm")
    assert event.metrics["grad_norm"] == pytest.approx(expected, rel=1e-5)


def test_lossguard_stop_cli_raises_training_stopped_at_the_next_log(topics):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reporter = _watch(topics, "torch-stop", model, optimizer, raise_on_stop=True)
    proc = None
    stopped_at = None
    try:
        for step in range(2000):
            reporter.log(step, loss=1.0)
            if step == 5:
                proc = subprocess.Popen([sys.executable, "-m", "stream_app", "stop", "torch-stop", "--force", "--reason",
                                         "operator says so"], cwd=ROOT, env=topics.env(),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            time.sleep(0.01)
    except producers.TrainingStopped as exc:
        stopped_at = step
        assert exc.reason == "operator says so"
    finally:
        reporter.close()
    out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, out
    assert stopped_at is not None and stopped_at < 1500
    records = read_topic(topics.bootstrap, topics.name("control"), topics.partitions, timeout=0.5)
    (record,) = records
    assert record.key == b"torch-stop"
    assert decode_control_event(record.value).action == "stop"


@pytest.mark.parametrize("transport", ["process", "thread"])
def test_non_finite_values_arrive_as_signals_and_stop_requests_reach_either_transport(topics, transport):
    from detectors.events import ControlEvent
    from stream_app.control_cli import send_control

    reporter = _watch(topics, f"nonfinite-{transport}", transport=transport)
    in_process = [t.name for t in threading.enumerate() if t.name.startswith("lossguard-control")]
    assert bool(in_process) == (transport == "thread")  # with a sender process, the consumer runs there
    for step, loss in enumerate([1.0, math.nan, math.inf, -math.inf]):
        reporter.log(step, loss=torch.tensor(loss))
    assert reporter.flush(5.0)
    send_control(ControlEvent(f"nonfinite-{transport}", "stop", "diverged"), topics.bootstrap,
                 topics.name("control"), topics.partitions)
    deadline = time.monotonic() + 10
    while not reporter.should_stop and time.monotonic() < deadline:
        time.sleep(0.05)
    reporter.close()
    assert reporter.should_stop and reporter.stop_reason == "diverged"
    losses = [e.metrics["loss"] for e in _events(topics, f"nonfinite-{transport}")]
    assert losses[0] == 1.0 and math.isnan(losses[1]) and losses[2:] == [math.inf, -math.inf]


@pytest.mark.parametrize("transport", ["thread", "process"])
def test_a_non_finite_loss_or_grad_norm_is_sent_at_once_and_healthy_steps_keep_the_interval(topics, transport):
    """With a 6 s send interval, a NaN loss (CPU tensor) and an infinite grad norm each reach the topic in
    well under the interval; a healthy step logged after them waits for the interval."""
    from kafka import KafkaConsumer, TopicPartition

    run = f"urgent-{transport}"
    consumer = KafkaConsumer(bootstrap_servers=topics.bootstrap, group_id=None, enable_auto_commit=False,
                             fetch_max_wait_ms=20)
    tps = [TopicPartition(topics.name("metrics"), p) for p in range(topics.partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    arrived: dict[int, float] = {}

    def poll(until: float) -> None:
        while time.monotonic() < until:
            for records in consumer.poll(timeout_ms=50).values():
                for record in records:
                    for event in decode_metric_record(record.value):
                        if event.run_id == run:
                            arrived.setdefault(event.step, time.monotonic())

    reporter = _watch(topics, run, transport=transport, send_interval=6.0)
    logged: dict[int, float] = {}

    def log(step: int, wait: float, **values) -> None:
        logged[step] = time.monotonic()
        reporter.log(step, **values)
        poll(logged[step] + wait)

    try:
        reporter.log(0, loss=1.0)
        assert reporter.flush(10.0)  # connected
        poll(time.monotonic() + 1.0)
        log(1, 1.0, loss=1.0)  # sent at once (the sender was idle), then the sender lingers for 6 s
        log(2, 1.0, loss=1.0)  # healthy: queued until the interval ends...
        assert 2 not in arrived
        log(3, 2.5, loss=torch.tensor(float("nan")))  # ...or until an urgent step comes
        log(4, 1.0, loss=1.0)
        assert 4 not in arrived
        log(5, 2.5, loss=1.0, grad_norm=math.inf)
    finally:
        reporter.close()
        consumer.close()
    fast = {step: arrived.get(step, math.inf) - logged[step] for step in (1, 3, 5)}
    assert all(seconds < 2.0 for seconds in fast.values()), fast
    assert arrived[2] >= arrived[3] - 0.5 and arrived[4] >= arrived[5] - 0.5  # they went with the urgent steps


def test_every_kind_of_value_arrives_as_a_number_or_is_left_out(topics):
    """Steps of plain numbers are packed as they are and the sender process makes floats of them; a step
    with a tensor, a numpy scalar or a summary is read on the sender thread first. Both arrive alike."""
    import numpy as np

    reporter = _watch(topics, "kinds", tags={"model": "m"})
    reporter.log(0, loss=1.5, batch_size=8, tokens=np.int64(7), note="not a number", ratio="0.25")  # numpy
    assert reporter.flush(5.0)  # each step its own batch: each takes its own way
    reporter.log(1, loss=2.5, batch_size=8, kl=3, note="not a number", ratio="0.25")  # plain only
    assert reporter.flush(5.0)
    reporter.log(2, loss=torch.tensor(3.5), rewards=[1.0, 2.0, 3.0])  # a summary
    reporter.tags = {**reporter.tags, "phase": "b"}
    reporter.log(3, loss=4.5)  # batched with step 2, with tags of its own
    assert reporter.flush(5.0)
    reporter.close()
    events = {e.step: e for e in _events(topics, "kinds")}
    assert sorted(events) == [0, 1, 2, 3]
    m0, m1, m2 = events[0].metrics, events[1].metrics, events[2].metrics
    assert (m0["loss"], m0["batch_size"], m0["tokens"], m0["ratio"]) == (1.5, 8.0, 7.0, 0.25)
    assert (m1["loss"], m1["batch_size"], m1["kl"], m1["ratio"]) == (2.5, 8.0, 3.0, 0.25)
    assert "note" not in m0 and "note" not in m1
    assert all(type(v) is float for e in events.values() for v in e.metrics.values())
    assert m2["loss"] == 3.5 and m2["reward_mean"] == 2.0 and "rewards" not in m2
    assert all(e.metrics["rss"] > 1e6 for e in events.values())
    assert events[0].tags["model"] == "m" and "phase" not in events[2].tags and events[3].tags["phase"] == "b"


def test_broker_absent_training_completes_and_drops_are_counted():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    nobody = f"127.0.0.1:{free_port()}"
    reporter = producers.watch("absent", model=model, optimizer=optimizer, bootstrap=nobody,
                               topic="absent.metrics", max_queue=50)
    start = time.perf_counter()
    last = _train(reporter, model, optimizer, 300)
    trained = time.perf_counter() - start
    reporter.close(timeout=0.5)
    assert last == 299 and trained < 10
    # 250 overflowed, 50 left at close, and the closing status=finished event
    assert reporter.stats["sent"] == 0 and reporter.dropped == 301


def test_broker_killed_mid_run_training_completes_and_drops_are_counted():
    with EmbeddedBroker(port=free_port()) as broker:
        ensure_topics(broker.bootstrap, ["killed.metrics", "killed.control"], 1)
        model = _model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        reporter = producers.watch("killed", model=model, optimizer=optimizer, bootstrap=broker.bootstrap,
                                   topic="killed.metrics", max_queue=100)
        _train(reporter, model, optimizer, 50)
        assert reporter.flush(5.0)
        broker.stop()
        start = time.perf_counter()
        last = _train(reporter, model, optimizer, 400)
        trained = time.perf_counter() - start
        reporter.close(timeout=1.0)
    reporter.emitter._thread.join(10)  # let a send that was under way settle, then every event is accounted for
    stats = reporter.stats
    assert last == 399 and trained < 10
    assert stats["sent"] >= 50 and stats["dropped"] >= 300
    assert stats["sent"] + stats["dropped"] == stats["queued"] == 451  # 450 steps + the closing event


def test_forked_child_sends_nothing_and_parent_is_unaffected(topics):
    reporter = _watch(topics, "forked", listen=False)
    reporter.log(0, loss=1.0)
    assert reporter.flush(5.0)
    pid = os.fork()
    if pid == 0:  # a DataLoader worker, say
        try:
            for step in range(1, 6):
                reporter.log(step, loss=2.0)
            ok = reporter.emitter.stats.queued == 1 and not reporter.enabled
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    reporter.log(6, loss=3.0)
    reporter.close()
    assert os.waitstatus_to_exitcode(status) == 0
    events = _events(topics, "forked", closing=True)
    assert [e.step for e in events] == [0, 6, 6]
    assert [e.tags.get("status") for e in events] == [None, None, "finished"]  # close() ends the run on purpose


def test_only_the_reporting_rank_sends_unless_every_rank_reports(topics, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    quiet = _watch(topics, "ranked", listen=False)  # default report_rank=0: rank 1 stays quiet
    tagged = _watch(topics, "ranked", listen=False, report_rank=None)
    assert not quiet.enabled and quiet.emitter is None
    for reporter in (quiet, tagged):
        reporter.log(0, loss=1.0)
        reporter.close()
    (event,) = _events(topics, "ranked")
    assert event.tags["rank"] == "1"


def test_producers_never_import_faust():
    code = ("import sys, producers, producers.torch, producers.control, producers.timing; "
            "assert 'faust' not in sys.modules, 'faust imported'; assert 'stream_app' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
    # the framework integrations pull in transformers/lightning (slow to import): check their imports statically
    for path in (ROOT / "producers").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("faust", "stream_app") for n in names), path


def test_the_stream_worker_never_imports_torch(tmp_path):
    """The worker reads ``producers.kafka_security`` only: importing the package must not pull in torch
    (1.5 s at start, and ~140k objects that every full garbage collection of the worker would traverse)."""
    code = ("import sys, stream_app.app, producers; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert producers.watch.__module__ == 'producers.torch'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120,
                   env={**os.environ, "LOSSGUARD_DATA_DIR": str(tmp_path)})


def _sender_children(marker: str) -> list[int]:
    """Pids of sender subprocesses whose command line mentions ``marker`` (read from /proc, never cut)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "sender_child.py" in args and marker in args:
            pids.append(int(proc.name))
    return pids


def test_the_sender_subprocess_imports_no_torch_and_ends_with_a_killed_training_process(tmp_path):
    with EmbeddedBroker(port=free_port()) as broker:
        topic = f"killedjob{os.getpid()}.metrics"
        ensure_topics(broker.bootstrap, [topic], 1)
        script = tmp_path / "job.py"
        script.write_text(
            "import sys, time\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "import producers\n"
            f"r = producers.watch('job', bootstrap={broker.bootstrap!r}, topic={topic!r}, listen=False)\n"
            "for s in range(20):\n"
            "    r.log(s, loss=1.0)\n"
            "r.flush(10)\n"
            "print(r.emitter.stats.sent, flush=True)\n"
            "time.sleep(60)\n")
        job = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
        try:
            assert job.stdout.readline().strip() == "20"  # delivered through the sender subprocess
            children = _sender_children(topic)
            assert len(children) == 1
            maps = Path(f"/proc/{children[0]}/maps").read_text()
            assert "libtorch" not in maps  # kafka-python and the stdlib only
        finally:
            job.kill()
            job.wait(10)
        deadline = time.monotonic() + 15
        while _sender_children(topic) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _sender_children(topic) == []  # EOF on its stdin ended it: no orphan


def test_a_sender_process_that_dies_while_idle_is_replaced_and_stop_requests_still_arrive(topics):
    reporter = _watch(topics, "torch-respawn", _model())
    try:
        reporter.log(0, loss=1.0)
        assert reporter.flush(10)
        first = reporter.emitter._producer.process
        first.kill()  # the training job is idle (a long evaluation, say) when its sender dies
        first.wait(5)
        deadline = time.monotonic() + 10
        while reporter.emitter._producer is None or reporter.emitter._producer.process is first:
            assert time.monotonic() < deadline, "no new sender process"
            time.sleep(0.1)
        time.sleep(1.0)  # the new sender has joined the control partition
        out = subprocess.run([sys.executable, "-m", "stream_app", "stop", "torch-respawn", "--force", "--reason", "respawned"],
                             cwd=ROOT, env=topics.env(), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        deadline = time.monotonic() + 15
        while not reporter.should_stop and time.monotonic() < deadline:
            time.sleep(0.1)
        assert reporter.should_stop and reporter.stop_reason == "respawned"
        reporter.log(1, loss=1.0)
        assert reporter.flush(10) and reporter.stats["sent"] == 2
    finally:
        reporter.close()
