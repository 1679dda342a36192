"""`make demo`'s main path, shortened with --fast, as a real subprocess: the README command cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

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
    # nothing left behind: no worker or trainer of this demo still running
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout  # -ww: never cut
    assert str(out) not in ps
