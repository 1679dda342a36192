"""Stream benchmark, one run on one broker: ceiling, floor, and the lossguard worker.

1. raw aiokafka consume rate of single metric events (the ceiling);
2. a plain Faust agent that only counts them (the floor);
3. ``lossguard worker`` with every registered detector at default settings:
   - metric steps/s per worker process, single events and batched records (``detectors.events.encode_metric_batch``),
     over 10k runs — and the worker's memory per tracked run (RSS growth / runs);
   - end-to-end latency from ``log()`` (the event's ``ts``) to the alert on the alert topic, p50/p99.

Prints a table and writes benchmarks/results/stream.json. Broker: LOSSGUARD_BOOTSTRAP, else the embedded
one. About 2–3 minutes on 2 cores.

    .venv/bin/python benchmarks/stream/run.py [--runs 10000] [--steps-per-run 40] [--batch 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402

from detectors import DETECTORS, MetricEvent, decode_alert  # noqa: E402
from detectors.events import encode_metric_batch  # noqa: E402
from stream_app.broker import EmbeddedBroker, ensure_topics, free_port  # noqa: E402

PARTITIONS = 6


def event(run: str, step: int, ts: float | None = None, loss: float | None = None) -> MetricEvent:
    """A realistic step: the canonical metrics a torch loop logs; the loss decays towards a floor with
    ±5 % minibatch noise (a curve that stays positive however long the run)."""
    wobble = ((step * 7919) % 97) / 970
    curve = (0.4 + 1.6 * math.exp(-step / 800)) * (0.95 + wobble)
    return MetricEvent(run, step, {
        "loss": curve if loss is None else loss, "grad_norm": 1.0 + wobble,
        "lr": 1e-3, "step_time": 0.1 + wobble / 100, "throughput": 1000.0, "mem_allocated": 2e9},
        ts=time.time() if ts is None else ts, source="bench", tags={"bench": "stream"})


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024,
                             max_request_size=8 * 1024 * 1024)
    for key, value in records:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def raw_consume_rate(bootstrap: str, topic: str, total: int) -> float:
    from aiokafka import AIOKafkaConsumer

    async def consume() -> float:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                    auto_offset_reset="earliest", fetch_max_wait_ms=10)
        await consumer.start()
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        await consumer.seek_to_beginning()
        seen, start = 0, 0.0
        try:
            while seen < total:
                batch = await consumer.getmany(timeout_ms=1000)
                if seen == 0 and batch:
                    start = time.perf_counter()
                seen += sum(len(records) for records in batch.values())
        finally:
            await consumer.stop()
        return total / (time.perf_counter() - start)

    return asyncio.run(consume())


def plain_faust_rate(bootstrap: str, topic: str, total: int) -> float:
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("plain_agent.py")), bootstrap, topic,
                          str(total), f"bench-plain-{uuid.uuid4().hex[:6]}"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    found = re.search(r'\{"records": \d+, "seconds": [\d.e-]+\}', out.stdout + out.stderr)  # Faust logs stdout
    if not found:
        raise RuntimeError(f"the plain Faust agent failed:\n{out.stdout[-1500:]}{out.stderr[-1500:]}")
    result = json.loads(found[0])
    return result["records"] / result["seconds"]


class Worker:
    """``lossguard worker`` as a subprocess with its web port, read through /lossguard/stats/."""

    def __init__(self, bootstrap: str, prefix: str, data_dir: str, profile: str | None = None):
        self.port = free_port()
        env = {**os.environ, "LOSSGUARD_BOOTSTRAP": bootstrap, "LOSSGUARD_TOPIC_PREFIX": prefix,
               "LOSSGUARD_APP_ID": f"{prefix}-app", "LOSSGUARD_PARTITIONS": str(PARTITIONS),
               "LOSSGUARD_DATA_DIR": data_dir, "LOSSGUARD_WEB_PORT": str(self.port)}
        self.log = open(Path(data_dir) / "worker.log", "wb")
        # --profile-worker: the whole worker under cProfile (written when it stops; slows it down)
        command = ["-m", "cProfile", "-o", str(Path(profile).resolve()), "-m"] if profile else ["-m"]
        self.proc = subprocess.Popen([sys.executable, *command, "stream_app", "worker"], env=env, cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/lossguard/stats/", timeout=2) as r:
            return json.load(r)

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def feed(self, bootstrap: str, topic: str, records: list[tuple[bytes, bytes]], steps: int,
             timeout: float) -> tuple[float, dict]:
        """Seconds the worker takes to process ``records`` (``steps`` steps in all) from a backlog, as the
        ceiling and the floor are measured: the worker is paused (SIGSTOP) while they are produced, so
        neither the producer's pace nor its CPU share on this small machine enters the figure."""
        base = self.stats()["events"]
        os.killpg(self.proc.pid, signal.SIGSTOP)
        try:
            produce(bootstrap, topic, records)
        finally:
            os.killpg(self.proc.pid, signal.SIGCONT)
        start, cpu = time.perf_counter(), self.cpu_seconds()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.stats()
            if stats["events"] - base >= steps:
                seconds = time.perf_counter() - start
                self.last_cpu_share = (self.cpu_seconds() - cpu) / seconds
                return seconds, stats
            time.sleep(0.02)
        raise TimeoutError(f"worker processed {self.stats()['events'] - base} of {steps} steps: {self.stats()}")

    def cpu_seconds(self) -> float:
        """CPU time the worker has used so far (all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def wait_ready(worker: Worker, bootstrap: str, topic: str, timeout: float = 60.0) -> None:
    """Send one event and wait until the worker processed it (the worker joined and recovered)."""
    produce(bootstrap, topic, [(b"warmup", event("warmup", 0).to_json())])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if worker.stats()["events"] >= 1:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the worker did not start")


def measure_latency(bootstrap: str, prefix: str, samples: int, rate_hz: float) -> list[float]:
    """``log()`` → alert, through the real path: a job reporting with ``producers.watch`` in its own
    process (``latency_job.py``: sender process and send interval at their defaults), the broker, the
    worker, the alert topic. Latency = the alert's arrival − the ``ts`` that ``log()`` stamped on the
    NaN step (one clock: the same machine)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             fetch_max_wait_ms=5)
    tps = [TopicPartition(f"{prefix}.alerts", p) for p in range(PARTITIONS)]
    consumer.assign(tps)
    consumer.seek_to_end(*tps)
    for tp in tps:
        consumer.position(tp)
    run = f"lat-{uuid.uuid4().hex[:6]}"
    job = subprocess.Popen([sys.executable, str(Path(__file__).with_name("latency_job.py")), bootstrap,
                            f"{prefix}.metrics", run, str(samples), str(rate_hz)], cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    latencies: list[float] = []
    deadline = time.monotonic() + samples / rate_hz + 30
    try:
        while time.monotonic() < deadline and len(latencies) < samples:
            for records in consumer.poll(timeout_ms=5).values():
                now = time.time()
                for record in records:
                    alert = decode_alert(record.value)
                    if alert.run_id == run and alert.alert_type == "nonfinite_metric" and alert.status == "firing":
                        latencies.append(now - alert.ts)
    finally:
        job.wait(30)
        consumer.close()
    return sorted(v * 1000 for v in latencies)


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")



def bootstrap_or_embedded() -> tuple[EmbeddedBroker | None, str]:
    """``LOSSGUARD_BOOTSTRAP`` when set (a real Kafka), else a bundled broker started here (and returned, to
    stop)."""
    bootstrap = os.environ.get("LOSSGUARD_BOOTSTRAP")
    if bootstrap:
        return None, bootstrap
    broker = EmbeddedBroker(port=free_port()).start()
    return broker, broker.bootstrap

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw-events", type=int, default=100_000)
    parser.add_argument("--faust-events", type=int, default=30_000)
    parser.add_argument("--single-events", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--steps-per-run", type=int, default=40)
    parser.add_argument("--batch", type=int, default=40, help="steps per batched record")
    parser.add_argument("--steady-runs", type=int, default=100,
                        help="runs of the steady workload (runs past their warm-up, as most runs are)")
    parser.add_argument("--steady-steps", type=int, default=2000, help="steps per run of the steady workload")
    parser.add_argument("--steady-batch", type=int, default=100, help="steps per record of the steady workload")
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--latency-rate", type=float, default=50.0, help="NaN events per second")
    parser.add_argument("--profile-worker", metavar="PATH",
                        help="run the worker under cProfile and write its profile to PATH (figures are slower)")
    args = parser.parse_args()

    broker, bootstrap = bootstrap_or_embedded()
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    kinds = ("metrics", "alerts", "control", "dlq", "raw")
    ensure_topics(bootstrap, [f"{prefix}.{k}" for k in kinds], PARTITIONS)
    results: dict = {"broker": "embedded (Tansu)" if broker else bootstrap, "detectors": sorted(DETECTORS),
                     "partitions": PARTITIONS, "cpu_count": os.cpu_count()}
    workdir = tempfile.mkdtemp(prefix="lossguard-bench-")
    worker = None
    t0 = time.monotonic()
    try:
        # 1 + 2: the ceiling and the floor, over the same single events
        raw = [(f"r{i % 1000}".encode(), event(f"r{i % 1000}", i // 1000, ts=1e9 + i).to_json())
               for i in range(args.raw_events)]
        produce(bootstrap, f"{prefix}.raw", raw)
        results["raw_aiokafka_events_per_s"] = raw_consume_rate(bootstrap, f"{prefix}.raw", args.raw_events)
        results["plain_faust_events_per_s"] = plain_faust_rate(bootstrap, f"{prefix}.raw", args.faust_events)

        # 3: the lossguard worker
        worker = Worker(bootstrap, prefix, workdir, args.profile_worker)
        wait_ready(worker, bootstrap, f"{prefix}.metrics")
        singles = [(f"s{i % 200}".encode(), event(f"s{i % 200}", i // 200, ts=1e9 + i // 200).to_json())
                   for i in range(args.single_events)]
        seconds, _ = worker.feed(bootstrap, f"{prefix}.metrics", singles, args.single_events, timeout=120)
        results["worker_single_steps_per_s"] = args.single_events / seconds

        rss_before = worker.rss_kb()
        batched = []
        for start in range(0, args.steps_per_run, args.batch):
            for r in range(args.runs):
                run = f"b{r}"
                steps = range(start, min(start + args.batch, args.steps_per_run))
                batched.append((run.encode(), encode_metric_batch([event(run, s, ts=1e9 + s) for s in steps])))
        total_steps = args.runs * args.steps_per_run
        seconds, stats = worker.feed(bootstrap, f"{prefix}.metrics", batched, total_steps, timeout=150)
        results["worker_batched_steps_per_s"] = total_steps / seconds
        results["batch_steps_per_record"] = args.batch
        results["tracked_runs"] = args.runs
        results["memory_per_run_kb"] = (worker.rss_kb() - rss_before) / args.runs

        # steady: the same runs go on past their warm-up (a worker's usual load); throughput is timed
        # over the last three quarters, after every run has had a quarter of its steps
        steady, sizes = [], []
        for start in range(0, args.steady_steps, args.steady_batch):
            for r in range(args.steady_runs):
                run = f"t{r}"
                steps = range(start, min(start + args.steady_batch, args.steady_steps))
                steady.append((run.encode(), encode_metric_batch([event(run, s, ts=1e9 + s) for s in steps])))
                sizes.append(len(steps))
        warm = len(steady) // 4
        worker.feed(bootstrap, f"{prefix}.metrics", steady[:warm], sum(sizes[:warm]), timeout=150)
        timed = sum(sizes[warm:])
        seconds, _ = worker.feed(bootstrap, f"{prefix}.metrics", steady[warm:], timed, timeout=150)
        results["worker_steady_steps_per_s"] = timed / seconds
        results["worker_steady_cpu_share"] = worker.last_cpu_share
        results["steady"] = {"runs": args.steady_runs, "steps_per_run": args.steady_steps,
                             "steps_per_record": args.steady_batch, "timed_steps": timed}

        latencies = measure_latency(bootstrap, prefix, args.latency_samples, args.latency_rate)
        results["alert_latency_ms"] = {"samples": len(latencies), "p50": pct(latencies, 0.5),
                                       "p90": pct(latencies, 0.9), "p95": pct(latencies, 0.95),
                                       "p99": pct(latencies, 0.99), "max": latencies[-1] if latencies else None,
                                       "mean": statistics.fmean(latencies) if latencies else None}
        results["worker_counters"] = worker.stats()
    finally:
        if worker:
            worker.stop()
        if broker:
            broker.stop()
    results["bench_seconds"] = time.monotonic() - t0

    lat = results["alert_latency_ms"]
    rows = [
        ("raw aiokafka consume (ceiling)", f"{results['raw_aiokafka_events_per_s']:,.0f} events/s", ""),
        ("plain Faust agent (floor)", f"{results['plain_faust_events_per_s']:,.0f} events/s", ""),
        ("lossguard worker, single events", f"{results['worker_single_steps_per_s']:,.0f} steps/s", "≥ 100k"),
        (f"lossguard worker, batched ×{args.batch}", f"{results['worker_batched_steps_per_s']:,.0f} steps/s", "≥ 100k"),
        (f"lossguard worker, steady runs, batched ×{args.steady_batch}",
         f"{results['worker_steady_steps_per_s']:,.0f} steps/s", "≥ 100k"),
        ("  worker CPU while it ran (1.0 = one core busy)", f"{results['worker_steady_cpu_share']:.2f}", ""),
        ("NaN → alert through watch(), p50 / p99", f"{lat['p50']:.0f} / {lat['p99']:.0f} ms", "p99 ≤ 50 ms"),
        (f"memory per tracked run ({args.runs:,} runs)", f"{results['memory_per_run_kb']:.1f} KB", "≤ 64 KB"),
    ]
    print(f"\nlossguard stream benchmark — {len(DETECTORS)} detectors, {PARTITIONS} partitions, "
          f"{results['broker']}, {results['bench_seconds']:.0f} s")
    print(f"{'':<44} {'measured':>22}  target")
    for name, value, target in rows:
        print(f"{name:<44} {value:>22}  {target}")
    out = ROOT / "benchmarks" / "results" / "stream.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
