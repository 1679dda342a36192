"""The on-call commands never hang and never dump a traceback: real subprocesses, the real broker, a real
worker under steady traffic, a closed pipe, an unknown run, and an address where no broker answers."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from kafka import KafkaProducer

from detectors import MetricEvent
from stream_app.broker import free_port
from stream_app.oncall import CONNECT_TIMEOUT_S
from tests.conftest import ROOT
from tests.stream_fixtures import wait_runs

pytestmark = pytest.mark.slow

LOSSGUARD = [sys.executable, "-m", "stream_app"]


def run_cli(topics, *args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run([*LOSSGUARD, *args, "--broker", topics.bootstrap, "--prefix", topics.prefix],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=topics.env())
    return proc, time.monotonic() - started


def test_no_broker_is_one_line_naming_the_address_and_exit_2_in_time():
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    for args in (["runs"], ["runs", "--json"], ["alerts", "tail"], ["report", "r1"], ["silence", "list"],
                 ["stop", "r1"]):
        started = time.monotonic()
        proc = subprocess.run([*LOSSGUARD, *args, "--broker", address], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        took = time.monotonic() - started
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(lines) == 1 and address in lines[0] and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert f"within {CONNECT_TIMEOUT_S:g} s" in lines[0] and proc.stdout == ""
        assert took < CONNECT_TIMEOUT_S + 10, f"{args} took {took:.1f}s"  # interpreter start-up on busy cores


def test_commands_answer_under_traffic_and_handle_unknown_runs_and_closed_pipes(topics, start_worker, tmp_path):
    start_worker()
    stop_sending = threading.Event()

    def busy_training() -> None:  # a fast run that never pauses: the topic never goes quiet
        producer = KafkaProducer(bootstrap_servers=topics.bootstrap, linger_ms=5)
        step = 0
        while not stop_sending.is_set() and step < 200_000:
            event = MetricEvent("busy-run", step, {"loss": 2.0 - (step % 100) / 1000}, ts=1000.0 + step / 100)
            producer.send(topics.name("metrics"), key=b"busy-run", value=event.to_json())
            step += 1
            if step % 50 == 0:
                time.sleep(0.01)
        producer.close()

    sender = threading.Thread(target=busy_training, daemon=True)
    sender.start()
    try:
        runs = wait_runs(topics.bootstrap, topics.app_id, lambda r: "busy-run" in r and r["busy-run"].events > 200)
        assert "busy-run" in runs, "the worker never summarized the busy run"

        proc, took = run_cli(topics, "runs", "--json", "--app-id", topics.app_id)
        assert proc.returncode == 0, proc.stderr
        [row] = [json.loads(line) for line in proc.stdout.splitlines()]
        assert row["run_id"] == "busy-run" and row["events"] > 200
        assert took < 20, f"`lossguard runs` took {took:.1f}s under traffic"

        proc, _ = run_cli(topics, "runs", "--app-id", topics.app_id)
        assert proc.returncode == 0 and "busy-run" in proc.stdout and "\033[" not in proc.stdout  # no colour in a pipe

        # the reader of the pipe is gone before a line is written: quiet exit, no BrokenPipeError traceback
        closed = subprocess.Popen([*LOSSGUARD, "runs", "--broker", topics.bootstrap, "--prefix", topics.prefix,
                                   "--app-id", topics.app_id], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=topics.env())
        closed.stdout.close()
        err = closed.stderr.read().decode()
        assert closed.wait(60) == 0 and err == "", err
        head = subprocess.run(f"set -o pipefail; {' '.join(LOSSGUARD)} runs --broker {topics.bootstrap} "
                              f"--prefix {topics.prefix} --app-id {topics.app_id} | head -1",
                              shell=True, executable="/bin/bash", cwd=ROOT, capture_output=True, text=True,
                              timeout=60, env=topics.env())
        assert head.returncode == 0 and head.stdout.startswith("run") and head.stderr == "", head.stderr

        out = tmp_path / "reports" / "nope.html"
        for args in (["report", "nope-run", "--out", str(out)], ["stop", "nope-run"]):
            proc, _ = run_cli(topics, *args, "--app-id", topics.app_id)
            assert proc.returncode == 2 and "unknown run nope-run" in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr
        assert not out.exists() and not out.parent.exists()

        proc, took = run_cli(topics, "report", "busy-run", "--app-id", topics.app_id, "--json",
                             "--out", str(tmp_path / "busy.html"))
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["run_id"] == "busy-run" and (tmp_path / "busy.html").exists()
        assert took < 20, f"`lossguard report` took {took:.1f}s under traffic"

        proc, _ = run_cli(topics, "stop", "busy-run", "--app-id", topics.app_id, "--json")
        assert proc.returncode == 0 and json.loads(proc.stdout)["action"] == "stop", proc.stderr
    finally:
        stop_sending.set()
        sender.join(10)
