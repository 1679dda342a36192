"""The operator's commands as real subprocesses against a real broker and worker:
alerts tail, runs, report, sinks (JSONL), silence add/list."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from kafka import KafkaProducer

from detectors import MetricEvent
from tests.conftest import ROOT, collect_alerts

pytestmark = pytest.mark.slow


def lossguard(topics, *args: str, env: dict | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "stream_app", *args, "--broker", topics.bootstrap,
                           "--prefix", topics.prefix], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=topics.env(**(env or {})))
    assert proc.returncode == 0, f"lossguard {' '.join(args)}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc


def test_operator_commands_read_what_the_worker_produced(topics, start_worker, tmp_path):
    start_worker()
    producer = KafkaProducer(bootstrap_servers=topics.bootstrap)
    hostile = "cli-\x1b]0;pwned\x07"  # a run id that would retitle the on-call's terminal if printed raw
    for run in ("cli-ok", "cli-nan", hostile):
        for step in range(30):
            loss = float("nan") if run == "cli-nan" and step == 25 else 2.0 - step / 100
            event = MetricEvent(run, step, {"loss": loss}, ts=1000.0 + step)
            producer.send(topics.name("metrics"), key=run.encode(), value=event.to_json())
    producer.flush()
    producer.close()
    collect_alerts(topics, lambda al: any(a.run_id == "cli-nan" for a in al), timeout=60)

    tail = lossguard(topics, "alerts", "tail", "--severity", "critical", "--max", "1", "--timeout", "30", "--json")
    [line] = tail.stdout.strip().splitlines()
    alert = json.loads(line)
    assert (alert["run_id"], alert["alert_type"], alert["step"]) == ("cli-nan", "nonfinite_metric", 25)

    runs = lossguard(topics, "runs", "--app-id", topics.app_id, "--json")
    by_run = {r["run_id"]: r for r in map(json.loads, runs.stdout.strip().splitlines())}
    assert set(by_run) == {"cli-ok", "cli-nan", hostile}
    assert by_run["cli-nan"]["last_step"] == 29 and by_run["cli-ok"]["events"] == 30
    table = lossguard(topics, "runs", "--app-id", topics.app_id).stdout
    assert "cli-\\x1b]0;pwned\\x07" in table and "\x1b" not in table and "\x07" not in table

    html = tmp_path / "cli-nan.html"
    report = lossguard(topics, "report", "cli-nan", "--app-id", topics.app_id, "--out", str(html))
    assert "cli-nan" in html.read_text() and "nonfinite_metric" in html.read_text()
    assert "cli-nan" in report.stdout

    alerts_dir = tmp_path / "alerts"
    lossguard(topics, "sinks", "--only", "jsonl", "--timeout", "8", env={"LOSSGUARD_ALERTS_DIR": str(alerts_dir)})
    written = [json.loads(line) for f in alerts_dir.rglob("*.jsonl") for line in f.read_text().splitlines()]
    assert any(a["run_id"] == "cli-nan" and a["alert_type"] == "nonfinite_metric" for a in written)

    lossguard(topics, "silence", "add", "--run", "cli-*", "--severity", "medium", "--for", "2h",
              "--comment", "known noisy")
    listed = lossguard(topics, "silence", "list")
    assert "cli-*" in listed.stdout and "known noisy" in listed.stdout
