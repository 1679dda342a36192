"""A producer that is not lossguard: plain kafka-python, the metric-event contract, one JSON event per
message, key = run id. Nothing here imports lossguard; it is what a job in another language, a service
or a poller would write (run by benchmarks/stream/single_event.py).

    latency  BOOTSTRAP METRICS ALERTS RUNS ROUNDS OUT.json
        RUNS runs send a healthy step every 20 ms; every round, each run in turn sends a NaN loss, 50 ms
        after the previous run's. Writes the milliseconds from each NaN's send() to its critical alert
        arriving on ALERTS (alerts matched by run id and step).
    backlog  BOOTSTRAP METRICS RUNS EVENTS
        EVENTS healthy single events spread over RUNS runs, as fast as the client sends them.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

PERIOD_S = 0.02  # each run's step interval
NAN_GAP_S = 0.05  # between two runs' NaNs
CLEAN_STEPS = 30  # healthy steps after a NaN before the run's next NaN (a firing NaN episode resolves)


def metric_event(run: str, step: int, loss: float | str) -> bytes:
    """One step as the contract writes it: non-finite numbers as the strings "NaN"/"Infinity"."""
    wobble = ((step * 7919) % 97) / 970
    return json.dumps({"v": 1, "run_id": run, "step": step, "ts": time.time(), "source": "plain-client",
                       "metrics": {"loss": loss, "grad_norm": 1.0 + wobble, "lr": 1e-3,
                                   "step_time": 0.02 + wobble / 100},
                       "tags": {"client": "kafka-python"}}).encode()


def healthy_loss(step: int) -> float:
    wobble = ((step * 7919) % 97) / 970
    return (0.4 + 1.6 * math.exp(-step / 800)) * (0.95 + wobble)


def latency(bootstrap: str, metrics: str, alerts: str, runs: int, rounds: int) -> dict:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             fetch_max_wait_ms=5)
    tps = [TopicPartition(alerts, p) for p in consumer.partitions_for_topic(alerts) or []]
    consumer.assign(tps)
    consumer.seek_to_end(*tps)
    for tp in tps:
        consumer.position(tp)  # the end is resolved now, before the first NaN
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks=1)
    names = [f"plain-{i}" for i in range(runs)]
    sent: dict[tuple[str, int], float] = {}
    arrived: dict[tuple[str, int], float] = {}
    done = threading.Event()

    def listen() -> None:
        while not done.is_set():
            for records in consumer.poll(timeout_ms=5).values():
                now = time.time()
                for record in records:
                    alert = json.loads(record.value)
                    if alert.get("severity") == "critical" and alert.get("status", "firing") == "firing":
                        arrived.setdefault((alert["run_id"], alert["step"]), now)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    # warm-up: every run has healthy history (the detectors' warm-up) before the first NaN
    warm_steps = 40
    cycle_s = max(runs * NAN_GAP_S, (CLEAN_STEPS + 1) * PERIOD_S)
    total_ticks = warm_steps + int(math.ceil(rounds * cycle_s / PERIOD_S)) + 1
    nan_at = {}  # tick → runs whose step at that tick is a NaN
    for r in range(rounds):
        for i, name in enumerate(names):
            tick = warm_steps + int(round((r * cycle_s + i * NAN_GAP_S) / PERIOD_S))
            nan_at.setdefault(tick, []).append(name)
    start = time.perf_counter()
    for tick in range(total_ticks):
        time.sleep(max(0.0, start + tick * PERIOD_S - time.perf_counter()))
        poisoned = nan_at.get(tick, ())
        for name in names:
            if name in poisoned:
                value = metric_event(name, tick, "NaN")
                sent[name, tick] = time.time()
            else:
                value = metric_event(name, tick, healthy_loss(tick))
            producer.send(metrics, key=name.encode(), value=value)
    producer.flush()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not set(sent) <= set(arrived):
        time.sleep(0.05)
    done.set()
    listener.join(5)
    producer.close()
    consumer.close()
    ms = sorted((arrived[key] - t) * 1000 for key, t in sent.items() if key in arrived)
    return {"sent_nans": len(sent), "alerted": len(ms), "latencies_ms": ms}


def backlog(bootstrap: str, metrics: str, runs: int, events: int) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024)
    for i in range(events):
        run, step = f"plain-b{i % runs}", i // runs
        producer.send(metrics, key=run.encode(), value=metric_event(run, step, healthy_loss(step)))
    producer.flush()
    producer.close()


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "latency":
        result = latency(args[0], args[1], args[2], int(args[3]), int(args[4]))
        with open(args[5], "w") as out:
            json.dump(result, out)
    elif mode == "backlog":
        backlog(args[0], args[1], int(args[2]), int(args[3]))
    else:
        sys.exit(f"unknown mode {mode!r} (latency or backlog)")
