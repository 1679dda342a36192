"""Every benchmark, one after the other (`make bench`): detection quality, the detector suite, the stream
worker, the producer. Each prints its table and writes its JSON to benchmarks/results/ (the figures the
README quotes). ``--quick`` is a smoke run with small sizes (minutes less; its figures are not the README's
and the detection/producer JSON goes to a temporary folder instead).

    python benchmarks/run_all.py [--quick] [--only detection,detectors,stream,producer]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

QUICK = {
    "detection": ["--quick"],
    "detectors": ["--stream-runs", "20", "--stream-steps", "50"],
    "stream": ["--raw-events", "5000", "--faust-events", "2000", "--single-events", "1000", "--runs", "200",
               "--steady-runs", "10", "--steady-steps", "200", "--latency-samples", "20"],
    "producer": ["--quick"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not the README figures")
    parser.add_argument("--only", default=",".join(QUICK), help="comma-separated benchmarks (default: all)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(QUICK))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {sorted(QUICK)}")
    scratch = Path(tempfile.mkdtemp(prefix="lossguard-bench-"))
    failed = []
    for name in names:
        cmd = [sys.executable, str(HERE / name / "run.py")]
        if args.quick:
            cmd += QUICK[name]
            if name in ("detection", "producer"):
                cmd += ["--out", str(scratch / f"{name}.json")]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.monotonic()
        rc = subprocess.call(cmd, cwd=HERE.parent)
        print(f"=== {name}: exit {rc} after {time.monotonic() - start:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
