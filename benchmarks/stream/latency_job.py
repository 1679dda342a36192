"""The training side of the latency measure (run by benchmarks/stream/run.py): a job that reports through
``producers.watch`` — in its own process, as a training job does — a NaN loss RATE times a second, each
followed by healthy steps that close the episode, so that every NaN opens a new alert.

Usage: latency_job.py BOOTSTRAP TOPIC RUN_ID SAMPLES RATE
"""

from __future__ import annotations

import sys
import time

import producers

bootstrap, topic, run_id, samples, rate = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
reporter = producers.watch(run_id, bootstrap=bootstrap, topic=topic)  # defaults, as a training job has them
reporter.log(0, loss=1.0)
reporter.flush()  # connected: what is measured is a running job's latency, not its first connection
step = 1
next_send = time.perf_counter()
for _ in range(samples):
    time.sleep(max(0.0, next_send - time.perf_counter()))
    reporter.log(step, loss=float("nan"))
    for healthy in range(1, 25):  # nonfinite resolves after 20 clean steps
        reporter.log(step + healthy, loss=1.0)
    step += 25
    next_send += 1 / rate
reporter.close()
