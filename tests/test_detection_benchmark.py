"""The detection benchmark end to end: generate two real runs, score them, read the JSON it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "detection"


def test_generator_and_scorer_catch_a_nan_run_at_once(tmp_path: Path) -> None:
    corpus, out = tmp_path / "corpus", tmp_path / "detection.json"
    runs = ["digits-nonfinite-00", "wine-healthy-00"]
    subprocess.run([sys.executable, str(BENCH / "generate.py"), "--out", str(corpus), "--only", *runs],
                   check=True, cwd=ROOT, capture_output=True, timeout=120)
    labels = json.loads((corpus / "labels.json").read_text())
    assert sorted(r["run_id"] for r in labels["runs"]) == runs
    header = (corpus / "digits-nonfinite-00.csv").read_text().splitlines()[0]
    assert header == "step,loss,val_loss,grad_norm,lr,batch_size,step_time"

    done = subprocess.run([sys.executable, str(BENCH / "run.py"), "--corpus", str(corpus), "--split", "all",
                           "--quick", "--out", str(out)], check=True, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert "| nonfinite (1) |" in done.stdout and "lossguard" in done.stdout

    results = json.loads(out.read_text())
    assert {"split", "runs", "methods", "per_run", "best_combination", "table_markdown"} <= set(results)
    methods = results["methods"]
    assert {"lossguard", "keras_TerminateOnNaN", "river_PageHinkley", "all baselines"} <= set(methods)
    for summary in methods.values():
        assert {"per_type", "overall", "fa_per_10k", "false_alarms", "healthy_steps"} <= set(summary)
        assert summary["healthy_steps"] == 300 + 180 - 2  # the healthy run + the NaN run before its onset
    nan_run = results["per_run"]["digits-nonfinite-00"]
    assert nan_run["onset"] == 180
    assert nan_run["outcomes"]["lossguard"]["detected_at"] == 180
    assert nan_run["outcomes"]["lossguard"]["delay"] == 0
    assert nan_run["outcomes"]["keras_TerminateOnNaN"]["delay"] == 0
    assert methods["lossguard"]["per_type"]["nonfinite"] == {
        "runs": 1, "detected": 1, "recall": 1.0, "median_delay": 0}
