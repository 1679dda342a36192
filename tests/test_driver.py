"""One driver of the detectors everywhere: a user's detector loaded by ``module:Class`` runs in
``lossguard replay`` (a real subprocess) and in a real worker through the broker, and replayed alerts carry
the source and the run's tags as the worker's do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from detectors import MetricEvent
from tests.conftest import collect_alerts
from tests.stream_fixtures import send

ROOT = Path(__file__).resolve().parents[1]
SPEC = "tests._user_detector:LossAboveTen"


def _replay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stream_app", "replay", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_replay_runs_a_user_detector_and_alerts_carry_source_and_tags(tmp_path):
    events = [MetricEvent("tagged", s, {"loss": 20.0 if s == 30 else 2.0 - s / 100}, ts=1000.0 + s,
                          source="hf", tags={"team": "vision"}) for s in range(40)]
    log = tmp_path / "run.jsonl"
    log.write_bytes(b"".join(e.to_json() + b"\n" for e in events))
    done = _replay(str(log), "--detector", SPEC)
    assert done.returncode == 0, done.stderr
    alerts = [json.loads(line) for line in done.stdout.splitlines()]
    mine = [a for a in alerts if a["alert_type"] == "loss_above_ten" and a["status"] == "firing"]
    assert [(a["step"], a["severity"], a["category"]) for a in mine] == [(30, "high", "custom")]
    assert all(a["metadata"]["source"] == "hf" and a["metadata"]["run_tags"] == {"team": "vision"}
               for a in alerts)

    without = _replay(str(log))
    assert without.returncode == 0 and "loss_above_ten" not in without.stdout


def test_replay_names_a_detector_that_cannot_load(tmp_path):
    log = tmp_path / "run.csv"
    log.write_text("step,loss\n1,2.0\n")
    for spec in ("tests._user_detector:Missing", "no_such_module_xyz:Det", "tests._user_detector"):
        done = _replay(str(log), "--detector", spec)
        assert done.returncode == 2 and spec in done.stderr, done.stderr


@pytest.mark.slow
def test_worker_runs_a_user_detector(topics, start_worker):
    worker = start_worker(extra_env={"LOSSGUARD_DETECTORS": SPEC})
    events = [MetricEvent("user-det", s, {"loss": 20.0 if s == 12 else 2.0}, ts=1000.0 + s, source="lightning",
                          tags={"team": "nlp"}) for s in range(20)]
    send(topics.bootstrap, topics.name("metrics"), events, batch=5)
    alerts = collect_alerts(topics, lambda al: any(a.alert_type == "loss_above_ten" for a in al), timeout=60)
    mine = [a for a in alerts if a.alert_type == "loss_above_ten"]
    assert mine, worker.log()[-3000:]
    assert mine[0].step == 12 and mine[0].metadata["source"] == "lightning"
    assert mine[0].metadata["run_tags"] == {"team": "nlp"}


def test_the_worker_and_replay_drive_the_suite_the_same_way():
    """The worker's driver (its RunSummary as the ledger) and a plain RunDriver (replay, managed jobs,
    in-process) give the same alerts, enrichment and counts on a stream with re-deliveries, a late step and
    a resume from a checkpoint."""
    from detectors import RunDriver
    from stream_app.aggregates import RunSummary

    def step(s: int, ts: float, loss: float, attempt: str = "0") -> MetricEvent:
        return MetricEvent("mixed", s, {"loss": loss, "grad_norm": 1.0}, ts=ts, source="hf",
                           tags={"team": "a", "attempt": attempt})

    stream = [step(s, 1000.0 + s, 2.0 - s / 100) for s in range(40)]
    stream += [step(38, 1038.0, 1.62), step(39, 1039.0, 1.61)]            # re-delivered
    stream += [step(50, 1050.0, 1.5), step(45, 1045.0, 1.55)]             # 45 arrives late
    stream += [step(51, 1051.0, float("nan"))]                             # a NaN loss
    stream += [step(s, 1100.0 + s, 1.7, attempt="1") for s in range(30, 36)]  # resumed from a checkpoint
    records = [stream[i:i + 5] for i in range(0, len(stream), 5)]

    plain, worker = RunDriver(), RunDriver(ledger=RunSummary("mixed"))
    got = {}
    for name, driver in (("plain", plain), ("worker", worker)):
        alerts = [a for record in records for a in driver.feed(record)]
        got[name] = [(a.step, a.alert_type, a.status, a.severity, a.metadata["source"], a.metadata["run_tags"])
                     for a in alerts]
    assert got["plain"] == got["worker"]
    assert any(t == "nonfinite_metric" and s == 51 for s, t, *_ in got["plain"])
    assert all(src == "hf" and tags["team"] == "a" for *_, src, tags in got["plain"])
    counts = [(d.ledger.events, d.ledger.duplicates, d.ledger.out_of_order, d.ledger.resumes, d.ledger.alerts)
              for d in (plain, worker)]
    assert counts[0] == counts[1] and counts[0][:4] == (40 + 2 + 6, 2, 1, 1), counts  # one resume, then new steps


def test_a_silence_alert_counts_with_the_runs_other_alerts():
    """A stalled_run alert comes from the clock, not from an event: the run's counts (what `lossguard runs`
    and the dashboard show) include it all the same."""
    from detectors import DetectorSuite
    from detectors.driver import RunDriver

    driver = RunDriver(DetectorSuite())
    for step in range(40):
        driver.feed([MetricEvent("quiet", step, {"loss": 2.0 - step / 100}, ts=1_000.0 + step, source="torch")])
    before = dict(driver.ledger.alerts)
    alerts = [a for a in driver.tick(1_000.0 + 39 + 3_600.0) if a.status == "firing"]
    assert [a.alert_type for a in alerts] == ["stalled_run"] and alerts[0].metadata["source"] == "torch"
    assert sum(driver.ledger.alerts.values()) == sum(before.values()) + 1
    assert driver.ledger.alerts[alerts[0].severity] == before[alerts[0].severity] + 1
