"""lossguard's own CPU time per step on the worker's workloads, without Kafka or Faust.

What the worker does to a record, in one process: decode it (``stream_app.intake.read_record``), feed its
steps to the run's driver (step-order ledger, run summary with its chart history, detector suite) and
encode the run's state as the table does (``_saved_value`` through the table's codec). CPU time (this
process) per step for each phase, over the last three quarters. What Faust, the broker and the neighbours
add is left out, so two versions of the code can be compared on a busy machine.

- ``steady``: ``run.py``'s steady workload — 100 runs × 2,000 steps in records of 100 steps; a save per record.
- ``single``: ``single_event.py``'s backlog — single events of 200 runs from the plain client, 600 steps
  each; the worker's grouping (GROUP steps of each run taken together, as from a backlog) and a save per
  run per group.

    .venv/bin/python benchmarks/stream/own_cpu.py [steady|single] [--group 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from event_client import healthy_loss, metric_event  # noqa: E402
from run import event  # noqa: E402

from detectors import DetectorSuite, RunDriver  # noqa: E402
from detectors.events import encode_metric_batch  # noqa: E402
from stream_app.aggregates import RunSummary  # noqa: E402
from stream_app.app import _saved_value  # noqa: E402
from stream_app.intake import read_record  # noqa: E402
from stream_app.saved_state import STATE_CODEC  # noqa: E402


def groups(workload: str, group: int) -> list[list[tuple[bytes, bytes]]]:
    """The records, in the groups the worker takes together."""
    if workload == "steady":
        records = [(f"t{r}".encode(), encode_metric_batch([event(f"t{r}", s, ts=1e9 + s) for s in range(start, start + 100)]))
                   for start in range(0, 2000, 100) for r in range(100)]
        return [records[i:i + 20] for i in range(0, len(records), 20)]
    out = []
    for start in range(0, 600, group):
        out.append([(f"plain-b{r}".encode(), metric_event(f"plain-b{r}", s, healthy_loss(s)))
                    for s in range(start, start + group) for r in range(200)])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", nargs="?", choices=("steady", "single"), default="steady")
    parser.add_argument("--group", type=int, default=10, help="single: steps of each run taken together")
    args = parser.parse_args()
    work = groups(args.workload, args.group)
    drivers: dict[str, RunDriver] = {}
    spent = {"decode": 0.0, "detectors and summary": 0.0, "state encoding": 0.0}
    steps = 0
    for i, records in enumerate(work):
        t0 = time.process_time()
        by_run: dict[str, list] = {}
        for key, value in records:
            events = read_record(key, value, 1 << 22)
            by_run.setdefault(events[0].run_id, []).extend(events)
        t1 = time.process_time()
        for run_id, events in by_run.items():
            driver = drivers.get(run_id)
            if driver is None:
                driver = drivers[run_id] = RunDriver(DetectorSuite(), ledger=RunSummary(run_id, 60.0, 10))
            driver.feed(events)
        t2 = time.process_time()
        for run_id in by_run:
            STATE_CODEC.dumps(_saved_value(drivers[run_id]))
        t3 = time.process_time()
        if i >= len(work) // 4:
            steps += sum(len(events) for events in by_run.values())
            for name, seconds in zip(spent, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                spent[name] += seconds
    parts = ", ".join(f"{name} {seconds / steps * 1e6:.2f}" for name, seconds in spent.items())
    print(f"{args.workload}: {sum(spent.values()) / steps * 1e6:.2f} µs a step ({parts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
