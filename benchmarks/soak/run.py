"""Soak benchmark: N runs reporting for M minutes through one lossguard worker, bounded.

Every run sends ``--rate`` steps a second, batched once a second as the reporter does; every
``--probe-every`` seconds a fresh probe run logs a few healthy steps and then a NaN loss, and the time
from that send to the ``nonfinite_metric`` alert on the alert topic is one latency sample. Reports:
events sent = events the worker processed (its /lossguard/stats/), dead letters, worker RSS at the start
and the end, the worker's lag (steps sent − processed) sampled every second and the time it takes to
drain after the last send, and alert latency p50/p99.

Prints a table and writes benchmarks/results/soak.json. Broker: LOSSGUARD_BOOTSTRAP, else the embedded one.

    .venv/bin/python benchmarks/soak/run.py [--runs 200] [--minutes 2] [--rate 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402

from benchmarks.stream.run import PARTITIONS, Worker, event, pct, wait_ready  # noqa: E402
from detectors import MetricEvent, decode_alert  # noqa: E402
from detectors.events import encode_metric_batch  # noqa: E402
from stream_app.broker import EmbeddedBroker, ensure_topics, free_port  # noqa: E402


class AlertWatch:
    """Reads the alert topic on a thread; ``arrived[run]`` = when a run's first nonfinite alert came."""

    def __init__(self, bootstrap: str, topic: str):
        self.arrived: dict[str, float] = {}
        self.total = 0
        self._stop = threading.Event()
        self._consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                       fetch_max_wait_ms=5)
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        self._consumer.assign(tps)
        self._consumer.seek_to_end(*tps)
        for tp in tps:
            self._consumer.position(tp)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for records in self._consumer.poll(timeout_ms=20).values():
                now = time.time()
                for record in records:
                    alert = decode_alert(record.value)
                    self.total += 1
                    if alert.alert_type == "nonfinite_metric" and alert.status == "firing":
                        self.arrived.setdefault(alert.run_id, now)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()


def soak(bootstrap: str, runs: int, minutes: float, rate: int, probe_every: float, data_dir: str) -> dict:
    prefix = f"soak{uuid.uuid4().hex[:6]}"
    ensure_topics(bootstrap, [f"{prefix}.{k}" for k in ("metrics", "alerts", "control", "dlq")], PARTITIONS)
    worker = Worker(bootstrap, prefix, data_dir)
    try:
        topic = f"{prefix}.metrics"
        wait_ready(worker, bootstrap, topic)
        watch = AlertWatch(bootstrap, f"{prefix}.alerts")
        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024, acks=1)
        base = worker.stats()["events"]
        rss_start = worker.rss_kb()
        sent, step, probes, lag = 0, 0, {}, []
        run_ids = [f"soak-{i}" for i in range(runs)]
        start = time.monotonic()
        next_probe = start + probe_every
        while (now := time.monotonic()) - start < minutes * 60:
            ts = time.time()
            for run in run_ids:  # one second of each run's steps as one batched record
                steps = [event(run, step + k, ts=ts + k / rate) for k in range(rate)]
                producer.send(topic, key=run.encode(), value=encode_metric_batch(steps))
            sent += runs * rate
            step += rate
            if now >= next_probe:
                probe = f"probe-{len(probes)}"
                for k in range(5):
                    producer.send(topic, key=probe.encode(), value=event(probe, k, ts=time.time()).to_json())
                producer.flush()
                probes[probe] = time.time()
                producer.send(topic, key=probe.encode(),
                              value=MetricEvent(probe, 5, {"loss": float("nan")}, ts=probes[probe]).to_json())
                sent += 6
                next_probe += probe_every
            producer.flush()
            lag.append(sent - (worker.stats()["events"] - base))
            time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
        last_send = time.monotonic()
        deadline = last_send + 120
        while worker.stats()["events"] - base < sent and time.monotonic() < deadline:
            time.sleep(0.05)
        drain_s = time.monotonic() - last_send
        time.sleep(1.0)
        stats = worker.stats()
        rss_end = worker.rss_kb()
        producer.close()
        watch.close()
        latencies = sorted((watch.arrived[p] - t) * 1000 for p, t in probes.items() if p in watch.arrived)
        return {"runs": runs, "minutes": minutes, "rate_per_run": rate, "events_sent": sent,
                "events_processed": stats["events"] - base, "dead_letters": stats.get("dead_letters", 0),
                "duplicates": stats.get("duplicates", 0), "rss_start_mb": round(rss_start / 1024, 1),
                "rss_end_mb": round(rss_end / 1024, 1), "lag_max_steps": max(lag, default=0),
                "lag_p50_steps": pct(sorted(lag), 0.5), "drain_s": round(drain_s, 2), "probes": len(probes),
                "probes_alerted": len(latencies), "alert_latency_p50_ms": round(pct(latencies, 0.5), 1),
                "alert_latency_p99_ms": round(pct(latencies, 0.99), 1), "worker_alive": worker.proc.poll() is None}
    finally:
        worker.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--rate", type=int, default=10, help="steps per second per run")
    parser.add_argument("--probe-every", type=float, default=2.0, help="seconds between NaN probe runs")
    args = parser.parse_args()
    import os

    with tempfile.TemporaryDirectory() as data_dir:
        if os.environ.get("LOSSGUARD_BOOTSTRAP"):
            result = soak(os.environ["LOSSGUARD_BOOTSTRAP"], args.runs, args.minutes, args.rate, args.probe_every,
                          data_dir)
        else:
            with EmbeddedBroker(port=free_port()) as broker:
                os.environ.setdefault("LOSSGUARD_MAX_BATCH_BYTES", "1")  # the bundled broker's quirk
                os.environ.setdefault("LOSSGUARD_PRODUCER_LINGER_S", "0")
                result = soak(broker.bootstrap, args.runs, args.minutes, args.rate, args.probe_every, data_dir)
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    out = ROOT / "benchmarks" / "results" / "soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out}")
    ok = result["events_processed"] == result["events_sent"] and result["worker_alive"] \
        and result["probes_alerted"] == result["probes"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
