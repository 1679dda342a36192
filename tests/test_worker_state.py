"""The worker keeps a run's detector state inside its ``run_summary`` value (one changelog message per
record) and restores it exactly.

Runs in a subprocess: importing ``stream_app.app`` builds the Faust app and installs its Faust fixes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import stream_app.app as A
    from detectors import MetricEvent

    A.run_summary = {}

    def steps(run, start, stop):
        return [MetricEvent(run, s, {"loss": 2.0 - s * 1e-3, "grad_norm": 1.0}, ts=1e9 + s)
                for s in range(start, stop)]

    # new layout: one value with the summary and the suite's state
    A.process(steps("r", 0, 30))
    saved = A.run_summary["r"]
    assert set(saved) >= {"run_id", "windows", A.SUITE_KEY}
    live = A._drivers["r"].suite.state_dict()
    A._drivers.clear()  # as after a restart or rebalance
    driver = A.driver_for("r")
    assert driver.suite.state_dict() == live and driver.ledger.last_step == 29
    A.process(steps("r", 30, 31))  # the restored suite carries on and saves the run the same way
    assert A.run_summary["r"][A.SUITE_KEY]["last_step"] == 30
    print("ok")
""")


def test_state_rides_in_the_summary_and_restores_exactly(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LOSSGUARD_DATA_DIR": str(tmp_path),
           "LOSSGUARD_WEB_ENABLED": "false"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-2000:]
