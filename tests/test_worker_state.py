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

#: the changelog format across versions: the table's codec writes the JSON that Faust's ``json`` codec (the
#: table's codec before stream_app.saved_state) wrote, and a worker reads back a value either one wrote
UPGRADE = textwrap.dedent("""
    import orjson
    from faust.serializers import codecs

    import stream_app.app as A
    from detectors import MetricEvent
    from stream_app.saved_state import STATE_CODEC

    A.run_summary = {}
    FAUST_JSON = codecs.get_codec("json")

    def steps(run, start, stop):  # single events, a spike at 700 (the chart history coarsens past 240 points)
        return [[MetricEvent(run, s, {"loss": 9.0 if s == 700 else 2.0 - s * 1e-3 + (s % 7) * 1e-2,
                                      "grad_norm": 1.0 + (s % 3) * 0.1, "lr": 1e-3}, ts=1e9 + s)]
                for s in range(start, stop)]

    def alerts(run, start, stop):
        return [(a.alert_type, a.step) for one in steps(run, start, stop) for a in A.process(one)]

    for one in steps("r", 0, 600):
        A.process(one)
    saved = A.run_summary["r"]
    ours = STATE_CODEC.dumps(saved)
    before = FAUST_JSON.dumps(dict(saved))  # the previous version's changelog message for the same value
    assert orjson.loads(ours) == orjson.loads(before) == FAUST_JSON.loads(ours)
    def renamed(message, name):  # the same run under another id
        return message.replace(b'"run_id":"r"', f'"run_id":"{name}"'.encode())

    for name, message in (("old", before), ("new", ours)):
        A.run_summary[name] = STATE_CODEC.loads(renamed(message, name))
    # the run carried on live, and the same run restored from either version's message: same alerts, same state
    expected = alerts("r", 600, 900)
    assert ("loss_spike", 700) in expected, expected
    for name in ("old", "new"):
        assert alerts(name, 600, 900) == expected, name
        restored, live = STATE_CODEC.dumps(A.run_summary[name]), STATE_CODEC.dumps(A.run_summary["r"])
        assert orjson.loads(restored) == orjson.loads(renamed(live, name)), name
    print("ok")
""")


def _run_ok(script: str, data_dir, timeout: int) -> None:
    """Run ``script`` in a fresh interpreter (its own Faust app and table) and require its closing "ok"."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LOSSGUARD_DATA_DIR": str(data_dir),
           "LOSSGUARD_WEB_ENABLED": "false"}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-2000:]


def test_state_rides_in_the_summary_and_restores_exactly(tmp_path):
    _run_ok(SCRIPT, tmp_path, 60)


def test_a_value_either_version_wrote_restores_the_run_exactly(tmp_path):
    _run_ok(UPGRADE, tmp_path, 120)
