"""Stream benchmark, single-event mode: what any producer gets, not only lossguard's own reporter.

The client (``event_client.py``: plain kafka-python, no lossguard code) writes the metric-event contract,
one JSON event per message, key = run id. Measured in one run on one broker, for three consumers:

- raw aiokafka (the ceiling) and a plain Faust agent (the floor), each reading the events and, for a NaN
  loss, publishing a critical alert (``relay.py``); ``lossguard worker`` at its defaults, every detector on;
- latency: RUNS runs send a healthy step every 20 ms, then each in turn a NaN loss 50 ms after the
  previous run's (ROUNDS rounds); the time from the NaN's ``send()`` to its critical alert on the alert
  topic, p50/p99;
- throughput: single events consumed from a backlog (the consumer paused while the backlog is written);
- beside them, the same worker's NaN → alert latency through lossguard's own reporter
  (``producers.watch()`` at its default send interval, ``latency_job.py``): from ``log()`` to the alert.

Prints a table and writes benchmarks/results/stream_single_event.json. Broker: LOSSGUARD_BOOTSTRAP, else
the embedded one. About 1–2 minutes on 2 cores.

    .venv/bin/python benchmarks/stream/single_event.py [--runs 20] [--rounds 5] [--events 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from event_client import healthy_loss, metric_event  # noqa: E402
from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402
from run import (  # noqa: E402
    PARTITIONS,
    Worker,
    bootstrap_or_embedded,
    measure_latency,
    pct,
    plain_faust_rate,
    produce,
    raw_consume_rate,
)

from stream_app.broker import ensure_topics  # noqa: E402


def wait_alerting(bootstrap: str, metrics: str, alerts: str, timeout: float = 90.0) -> None:
    """Send a NaN (a fresh run each second) until one comes back as an alert: the consumer has joined,
    recovered and reads from the current end."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             fetch_max_wait_ms=20, auto_offset_reset="earliest")
    consumer.assign([TopicPartition(alerts, p) for p in range(PARTITIONS)])
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    probes: set[str] = set()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            run = f"probe-{uuid.uuid4().hex[:6]}"
            probes.add(run)
            producer.send(metrics, key=run.encode(), value=metric_event(run, 0, "NaN"))
            producer.flush()
            until = time.monotonic() + 1.0
            while time.monotonic() < until:
                for records in consumer.poll(timeout_ms=100).values():
                    if any(json.loads(r.value).get("run_id") in probes for r in records):
                        return
        raise TimeoutError(f"no alert on {alerts} within {timeout:.0f} s")
    finally:
        producer.close()
        consumer.close()


def client_latency(bootstrap: str, prefix: str, runs: int, rounds: int) -> dict:
    """The client in its own process (as another producer is), against ``prefix``'s topics."""
    out = Path(tempfile.mkdtemp(prefix="lossguard-lat-")) / "latency.json"
    subprocess.run([sys.executable, str(HERE / "event_client.py"), "latency", bootstrap, f"{prefix}.metrics",
                    f"{prefix}.alerts", str(runs), str(rounds), str(out)], check=True, timeout=300)
    result = json.loads(out.read_text())
    ms = result.pop("latencies_ms")
    return {**result, "p50_ms": pct(ms, 0.5), "p90_ms": pct(ms, 0.9), "p99_ms": pct(ms, 0.99),
            "max_ms": ms[-1] if ms else None}


def relay_latency(kind: str, bootstrap: str, prefix: str, runs: int, rounds: int) -> dict:
    relay = subprocess.Popen([sys.executable, str(HERE / "relay.py"), kind, bootstrap, f"{prefix}.metrics",
                              f"{prefix}.alerts", f"{prefix}-relay"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_alerting(bootstrap, f"{prefix}.metrics", f"{prefix}.alerts")
        return client_latency(bootstrap, prefix, runs, rounds)
    finally:
        relay.kill()
        relay.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="runs in the latency measure")
    parser.add_argument("--rounds", type=int, default=5, help="NaNs per run in the latency measure")
    parser.add_argument("--events", type=int, default=20_000, help="single events in each backlog")
    parser.add_argument("--backlog-runs", type=int, default=200)
    parser.add_argument("--raw-events", type=int, default=100_000,
                        help="single events for raw aiokafka (it reads 20k in a few fetches: too few to time)")
    parser.add_argument("--watch-samples", type=int, default=200,
                        help="NaNs through producers.watch() (benchmarks/stream/latency_job.py), 50 a second")
    parser.add_argument("--lossguard-only", action="store_true", help="skip the ceiling and the floor")
    args = parser.parse_args()

    broker, bootstrap = bootstrap_or_embedded()
    tag = uuid.uuid4().hex[:6]
    prefixes = {name: f"single{tag}{name}" for name in ("raw", "faust", "lossguard")}
    ensure_topics(bootstrap, [f"{p}.{k}" for p in prefixes.values() for k in ("metrics", "alerts", "control", "dlq")],
                  PARTITIONS)
    results: dict = {"broker": "embedded (Tansu)" if broker else bootstrap, "partitions": PARTITIONS,
                     "cpu_count": os.cpu_count(), "latency_runs": args.runs, "latency_rounds": args.rounds,
                     "backlog_events": args.events}
    backlog = [(f"plain-b{i % args.backlog_runs}".encode(),
                metric_event(f"plain-b{i % args.backlog_runs}", i // args.backlog_runs,
                             healthy_loss(i // args.backlog_runs)))
               for i in range(args.events)]
    worker = None
    t0 = time.monotonic()
    try:
        if not args.lossguard_only:
            raw_topic = f"{prefixes['raw']}.metrics"
            copies = max(1, args.raw_events // args.events)
            produce(bootstrap, raw_topic, backlog * copies)
            results["raw_aiokafka_events_per_s"] = raw_consume_rate(bootstrap, raw_topic, len(backlog) * copies)
            results["plain_faust_events_per_s"] = plain_faust_rate(bootstrap, raw_topic, args.events)
            for kind, name in (("aiokafka", "raw"), ("faust", "faust")):
                results[f"{'raw_aiokafka' if name == 'raw' else 'plain_faust'}_latency"] = relay_latency(
                    kind, bootstrap, prefixes[name], args.runs, args.rounds)

        prefix = prefixes["lossguard"]
        worker = Worker(bootstrap, prefix, tempfile.mkdtemp(prefix="lossguard-bench-"))
        wait_alerting(bootstrap, f"{prefix}.metrics", f"{prefix}.alerts")
        results["lossguard_latency"] = client_latency(bootstrap, prefix, args.runs, args.rounds)
        # the same worker, lossguard's own reporter: producers.watch() at its default send interval
        ms = measure_latency(bootstrap, prefix, args.watch_samples, 50.0)
        results["watch_latency"] = {"sent_nans": args.watch_samples, "alerted": len(ms), "p50_ms": pct(ms, 0.5),
                                    "p90_ms": pct(ms, 0.9), "p99_ms": pct(ms, 0.99), "max_ms": ms[-1] if ms else None}
        seconds, _ = worker.feed(bootstrap, f"{prefix}.metrics", backlog, args.events, timeout=180)
        results["lossguard_events_per_s"] = args.events / seconds
        results["worker_counters"] = worker.stats()
    finally:
        if worker:
            worker.stop()
        if broker:
            broker.stop()
    results["bench_seconds"] = time.monotonic() - t0

    def lat(name: str) -> str:
        r = results[name]
        return f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f} ms ({r['alerted']}/{r['sent_nans']})"

    rows = [] if args.lossguard_only else [
        ("raw aiokafka (ceiling)", f"{results['raw_aiokafka_events_per_s']:,.0f}", lat("raw_aiokafka_latency")),
        ("plain Faust agent (floor)", f"{results['plain_faust_events_per_s']:,.0f}", lat("plain_faust_latency")),
    ]
    rows.append(("lossguard worker", f"{results['lossguard_events_per_s']:,.0f}", lat("lossguard_latency")))
    rows.append(("  the same, producers.watch()", "", lat("watch_latency")))
    print(f"\nlossguard stream benchmark, single events — {PARTITIONS} partitions, {results['broker']}, "
          f"{results['bench_seconds']:.0f} s")
    print(f"{'':<28} {'events/s (backlog)':>20}  {'NaN → alert p50 / p99 (alerted/sent)':>38}")
    for name, rate, latency in rows:
        print(f"{name:<28} {rate:>20}  {latency:>38}")
    out = ROOT / "benchmarks" / "results" / "stream_single_event.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
