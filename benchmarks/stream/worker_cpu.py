"""The worker's CPU time per event on the single-event backlog, optionally with a py-spy profile.

``single_event.py``'s backlog (20,000 single events of 200 runs, from the plain client) is fed FEEDS times
to one ``lossguard worker`` (paused while each is written, as there); for each feed it prints the events/s
and the worker's CPU time per event (all its threads, from /proc). On a shared machine the CPU time per
event moves less than the wall-clock rate. With ``--py-spy OUT`` the feeds after the first are sampled
(``py-spy record --gil``, raw format: one stack and its count a line) into OUT.

    .venv/bin/python benchmarks/stream/worker_cpu.py [--feeds 3] [--py-spy /tmp/worker.txt]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from event_client import healthy_loss, metric_event  # noqa: E402
from run import PARTITIONS, Worker, bootstrap_or_embedded  # noqa: E402
from single_event import wait_alerting  # noqa: E402

from stream_app.broker import ensure_topics  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--feeds", type=int, default=3)
    parser.add_argument("--events", type=int, default=20_000, help="single events in each feed")
    parser.add_argument("--backlog-runs", type=int, default=200)
    parser.add_argument("--py-spy", metavar="OUT", help="sample the worker with py-spy --gil into OUT")
    args = parser.parse_args()

    broker, bootstrap = bootstrap_or_embedded()
    prefix = f"cpu{uuid.uuid4().hex[:6]}"
    ensure_topics(bootstrap, [f"{prefix}.{k}" for k in ("metrics", "alerts", "control", "dlq")], PARTITIONS)
    worker = Worker(bootstrap, prefix, tempfile.mkdtemp(prefix="lossguard-cpu-"))
    spy = None
    per_run = args.events // args.backlog_runs
    try:
        wait_alerting(bootstrap, f"{prefix}.metrics", f"{prefix}.alerts")
        for feed in range(args.feeds):
            backlog = []
            for i in range(args.events):
                run, step = f"plain-b{i % args.backlog_runs}", feed * per_run + i // args.backlog_runs
                backlog.append((run.encode(), metric_event(run, step, healthy_loss(step))))
            if feed == 1 and args.py_spy:
                spy = subprocess.Popen([shutil.which("py-spy") or "py-spy", "record", "-p", str(worker.proc.pid),
                                        "--gil", "-r", "200", "-f", "raw", "-o", args.py_spy],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)
            cpu = worker.cpu_seconds()
            seconds, _ = worker.feed(bootstrap, f"{prefix}.metrics", backlog, args.events, timeout=180)
            print(f"feed {feed}: {args.events / seconds:,.0f} events/s, worker CPU "
                  f"{(worker.cpu_seconds() - cpu) / args.events * 1e6:.0f} µs an event", flush=True)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        worker.stop()
        if broker:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
