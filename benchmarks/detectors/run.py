"""Detector micro-benchmark: DetectorSuite steps/s on one core, per event and batched, and µs/step per detector.

Two workloads: the detection corpus (real runs, noisy, with failures: batches often fall back to the
step-by-step path), and the steps the stream benchmark sends (a smooth torch loop: batches are quiet).
Each run gets a fresh suite, fed event by event (``update``) or in records of ``--batch`` steps
(``update_batch``, as the worker does); ``state_dict()`` is timed per record too.

    .venv/bin/python benchmarks/detectors/run.py [--batch 40] [--stream-runs 200]

Prints a table and writes benchmarks/results/detectors.json. About 20 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "stream"))

from run import event as stream_event  # noqa: E402  (the stream benchmark's step)

from detectors import DetectorSuite, MetricEvent  # noqa: E402
from detectors.suite import _canonical  # noqa: E402
from stream_app.replay import read_events  # noqa: E402

CORPUS = ROOT / "benchmarks" / "detection" / "corpus"
RESULTS = ROOT / "benchmarks" / "results" / "detectors.json"


def chunks(events: list[MetricEvent], size: int) -> list[list[MetricEvent]]:
    return [events[i:i + size] for i in range(0, len(events), size)]


def suite_rate(runs: list[list[MetricEvent]], batch: int | None) -> tuple[float, float]:
    """(steps/s, µs per state_dict()) over ``runs``; ``batch`` None: ``update`` event by event."""
    steps, busy, saves, save_time = 0, 0.0, 0, 0.0
    for events in runs:
        suite = DetectorSuite()
        for record in chunks(events, batch or 1):
            t = time.perf_counter()
            if batch is None:
                suite.update(record[0])
            else:
                suite.update_batch(record)
            busy += time.perf_counter() - t
            if batch is not None:
                t = time.perf_counter()
                suite.state_dict()
                save_time += time.perf_counter() - t
                saves += 1
        steps += len(events)
    return steps / busy, save_time / max(saves, 1) * 1e6


def per_detector(runs: list[list[MetricEvent]], batch: int | None) -> dict[str, float]:
    """µs per step of each detector alone (events canonicalized and routed as the suite does)."""
    total: dict[str, float] = {}
    steps = 0
    for events in runs:
        events = [_canonical(e) for e in events]
        suite = DetectorSuite()
        for name, detector in suite.detectors.items():
            mine = [e for e in events if detector.reads(tuple(e.metrics))]
            t = time.perf_counter()
            for record in chunks(mine, batch or 1):
                if batch is None:
                    detector.update(record[0])
                else:
                    detector.update_batch(record)
            total[name] = total.get(name, 0.0) + time.perf_counter() - t
        steps += len(events)
    return {name: seconds / steps * 1e6 for name, seconds in sorted(total.items(), key=lambda kv: -kv[1])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=40, help="steps per batched record")
    parser.add_argument("--stream-runs", type=int, default=200, help="runs of the stream workload")
    parser.add_argument("--stream-steps", type=int, default=200, help="steps per run of the stream workload")
    args = parser.parse_args()
    workloads = {
        "corpus": [read_events(p) for p in sorted(CORPUS.glob("*.csv"))],
        "stream": [[stream_event(f"run-{r}", s, ts=1e9 + s) for s in range(args.stream_steps)]
                   for r in range(args.stream_runs)],
    }
    results: dict[str, dict] = {"batch": args.batch}
    print(f"| workload | steps | per event | batched ×{args.batch} | state_dict() |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in workloads.items():
        single, _ = suite_rate(runs, None)
        batched, save_us = suite_rate(runs, args.batch)
        results[name] = {"steps": sum(map(len, runs)), "suite_steps_per_s": single,
                         "suite_batched_steps_per_s": batched, "state_dict_us": save_us,
                         "detector_us_per_step": per_detector(runs, None),
                         "detector_us_per_step_batched": per_detector(runs, args.batch)}
        print(f"| {name} | {results[name]['steps']:,} | {single:,.0f} steps/s ({1e6 / single:.1f} µs) | "
              f"{batched:,.0f} steps/s ({1e6 / batched:.1f} µs) | {save_us:.0f} µs |")
    for name in workloads:
        print(f"\nµs/step per detector, {name} (per event / batched ×{args.batch}):")
        single, batched = (results[name]["detector_us_per_step"], results[name]["detector_us_per_step_batched"])
        for detector, us in single.items():
            print(f"  {detector:26s} {us:6.2f}  {batched[detector]:6.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
