"""`make demo`'s main path, shortened with --fast, as a real subprocess: the README command cannot rot."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_demo_fast_runs_end_to_end_and_cleans_up(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "stream_app", "demo", "--fast", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"demo-healthy", "demo-lr-jump", "demo-nan"}
    nan_alerts = [a for a in summary["demo-nan"]["alerts"] if a["alert_type"] == "nonfinite_metric"]
    assert nan_alerts and nan_alerts[0]["severity"] == "critical"
    assert nan_alerts[0]["step"] == summary["demo-nan"]["inject_at"]
    jump = summary["demo-lr-jump"]
    assert any(a["severity"] in ("high", "critical") and a["step"] >= jump["inject_at"] for a in jump["alerts"])
    healthy = summary["demo-healthy"]["alerts"]
    assert not [a for a in healthy if a["severity"] in ("high", "critical")]
    assert "summary" in proc.stdout and "[demo-nan]" in proc.stdout  # alerts were printed as they arrived
    for run_id in summary:  # each run's report, with its charts' data, and its path printed
        report = out / "reports" / f"{run_id}.report.html"
        assert str(report) in proc.stdout and '"loss"' in report.read_text() and "lgDrawCharts" in report.read_text()
    assert "nonfinite_metric" in (out / "reports" / "demo-nan.report.html").read_text()
    assert re.search(r"dashboard +http://127\.0\.0\.1:\d+/", proc.stdout)
    # nothing left behind: no worker or trainer of this demo still running
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout  # -ww: never cut
    assert str(out) not in ps


def test_demo_keep_serves_the_dashboard_until_ctrl_c(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "stream_app", "demo", "--fast", "--keep", "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any("Ctrl-C stops them" in line for line in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        text = "".join(lines)
        assert "Ctrl-C stops them" in text, text[-3000:]
        url = re.search(r"dashboard +(http://127\.0\.0\.1:\d+/)", text)[1]
        time.sleep(2.0)  # still up after the demo's runs are over
        with urllib.request.urlopen(url + "lossguard/api/runs", timeout=10) as response:
            runs = {r["run_id"] for r in json.loads(response.read())}
        assert runs == {"demo-healthy", "demo-lr-jump", "demo-nan"}
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out) not in ps
