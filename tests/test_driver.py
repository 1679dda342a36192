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
