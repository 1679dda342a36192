"""``lossguard demo``: the whole flow on one machine, started and stopped by itself.

Starts the embedded broker on a free port, creates the topics, starts a Faust worker, runs three real
torch training runs at once (healthy, a ×100 learning-rate jump, a NaN loss) that stream every step to
Kafka, prints alerts as they arrive on the alert topic, then stops everything and prints a per-run
summary. Every child runs in its own session and is killed on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from detectors import Alert, severity_rank

from .alerts_cli import format_alert, read_alerts
from .broker import BUNDLED_BROKER_WORKER_ENV, EmbeddedBroker, die_with_parent, ensure_topics, free_port
from .settings import load_settings

__all__ = ["run_demo", "add_parser"]

RUNS = (("demo-healthy", "healthy"), ("demo-lr-jump", "lr_jump"), ("demo-nan", "nan"))


def _spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)


def _kill(proc: subprocess.Popen, grace: float = 8.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


def run_demo(steps: int = 400, delay: float = 0.02, quiet_after: float = 6.0, max_wait: float = 90.0,
             out_dir: str | None = None, show: str = "medium", keep: bool = False) -> dict[str, dict]:
    """Run the demo; alerts of severity ``show`` and above are printed as they arrive (all are summarized).
    Each run's HTML report is written at the end; with ``keep`` the broker, worker and dashboard stay up
    until Ctrl-C."""
    out = Path(out_dir or tempfile.mkdtemp(prefix="lossguard-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    settings = load_settings(env={})
    broker = EmbeddedBroker(port=free_port())
    procs: list[subprocess.Popen] = []
    alerts: list[Alert] = []
    stop_reading = threading.Event()

    def interrupted(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        web_port = free_port()
        dashboard = f"http://127.0.0.1:{web_port}/"
        broker.start()
        ensure_topics(broker.bootstrap, settings.topics.values(), settings.partitions)
        print(f"broker     embedded Tansu on {broker.bootstrap}, topics {', '.join(settings.topics.values())}")
        env = {**os.environ, "LOSSGUARD_BOOTSTRAP": broker.bootstrap, "PYTHONUNBUFFERED": "1",
               "LOSSGUARD_DATA_DIR": str(out / "worker-data"), "LOSSGUARD_WEB_PORT": str(web_port),
               "LOSSGUARD_WEB_ENABLED": "true", **BUNDLED_BROKER_WORKER_ENV}
        env.pop("LOSSGUARD_CONFIG", None)
        env.pop("LOSSGUARD_TOPIC_PREFIX", None)
        procs.append(_spawn([sys.executable, "-m", "stream_app", "worker"], env, out / "worker.log"))
        print(f"worker     Faust worker pid {procs[0].pid} (log {out / 'worker.log'})")
        print(f"dashboard  {dashboard}")

        def reader():
            for alert in read_alerts(broker.bootstrap, settings.topic("alerts"), stop=stop_reading.is_set):
                alerts.append(alert)
                if alert.rank >= severity_rank(show):
                    print(format_alert(alert, colour=sys.stdout.isatty()), flush=True)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        trainers = {}
        for run_id, scenario in RUNS:
            proc = _spawn([sys.executable, "-m", "stream_app.demo_train", "--run-id", run_id, "--scenario",
                           scenario, "--steps", str(steps), "--delay", str(delay)], env, out / f"{run_id}.log")
            procs.append(proc)
            trainers[run_id] = proc
            print(f"training   {run_id:<13} scenario={scenario} steps={steps} pid {proc.pid}")
        print(f"alerts     ({show} and above, as they arrive on the alert topic)", flush=True)
        for proc in trainers.values():
            proc.wait()
        results = {}
        for run_id in trainers:
            lines = (out / f"{run_id}.log").read_text().strip().splitlines()
            results[run_id] = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
        # let the worker catch up: stop after `quiet_after` seconds without a new alert
        deadline = time.monotonic() + max_wait
        seen, quiet_since = len(alerts), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            if procs[0].poll() is not None:
                tail = (out / "worker.log").read_text()[-2000:]
                raise RuntimeError(f"the worker exited (code {procs[0].returncode}):\n{tail}")
            if len(alerts) != seen:
                seen, quiet_since = len(alerts), time.monotonic()
            elif alerts and time.monotonic() - quiet_since > quiet_after:
                break
        stop_reading.set()
        thread.join(5)
        reports = _write_reports(broker.bootstrap, settings, out)
        print("\nreports")
        for run_id, path in reports.items():
            print(f"  {run_id:<14} {path}")
        print(f"dashboard  {dashboard}")
        if keep:
            print("broker, worker and dashboard stay up; Ctrl-C stops them", flush=True)
            try:
                while procs[0].poll() is None:
                    time.sleep(0.5)
                print(f"the worker exited (code {procs[0].returncode}); see {out / 'worker.log'}", file=sys.stderr)
            except KeyboardInterrupt:
                pass
    finally:
        stop_reading.set()
        for proc in reversed(procs):
            _kill(proc)
        broker.stop()
        signal.signal(signal.SIGTERM, previous)
    return _summary(results, alerts, out)


def _write_reports(bootstrap: str, settings, out: Path) -> dict[str, Path]:
    from .oncall import UnknownRun
    from .runs_cli import write_report

    paths = {}
    for run_id, _scenario in RUNS:
        try:
            paths[run_id] = write_report(bootstrap, settings, run_id, out / "reports" / f"{run_id}.report.html")[1]
        except UnknownRun as exc:
            print(f"  {exc}", file=sys.stderr)
    return paths


def _summary(results: dict[str, dict], alerts: list[Alert], out: Path) -> dict[str, dict]:
    by_run: dict[str, list[Alert]] = defaultdict(list)
    for alert in alerts:
        by_run[alert.run_id].append(alert)
    print("\nsummary")
    print(f"  {'run':<14} {'scenario':<9} {'steps':>5} {'final loss':>10}  {'alerts (firing by severity)':<38} types")
    summary = {}
    for run_id, _scenario in RUNS:
        r = results.get(run_id, {})
        firing = [a for a in by_run[run_id] if a.status == "firing"]
        sev = Counter(a.severity for a in firing)
        types = sorted({a.alert_type for a in firing})
        sev_text = ", ".join(f"{sev[s]} {s}" for s in ("critical", "high", "medium", "low") if sev[s]) or "none"
        print(f"  {run_id:<14} {r.get('scenario', '?'):<9} {r.get('steps', 0):>5} {r.get('final_loss', float('nan')):>10.4g}"
              f"  {sev_text:<38} {', '.join(types) or '-'}")
        summary[run_id] = {**r, "alerts": [a.to_dict() for a in by_run[run_id]], "by_severity": dict(sev),
                           "types": types}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nlogs and summary.json in {out}")
    return summary


def cmd_demo(args: argparse.Namespace) -> int:
    steps, delay = (200, 0.0) if args.fast else (args.steps, args.delay)
    try:
        summary = run_demo(steps=steps, delay=delay, out_dir=args.out, show=args.severity, keep=args.keep)
    except KeyboardInterrupt:
        print("\ninterrupted; everything the demo started has been stopped", file=sys.stderr)
        return 130
    ok = any(a["alert_type"] == "nonfinite_metric" for a in summary["demo-nan"]["alerts"])
    return 0 if ok else 1


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", help="embedded broker + worker + three real training runs + alerts")
    p.add_argument("--steps", type=int, default=400, help="training steps per run (default 400)")
    p.add_argument("--delay", type=float, default=0.02, help="seconds per step spent sleeping (default 0.02)")
    p.add_argument("--fast", action="store_true", help="short runs, no sleeping (used by the test suite)")
    p.add_argument("--keep", action="store_true", help="keep broker, worker and dashboard up until Ctrl-C")
    p.add_argument("--out", help="folder for logs and summary.json (default a temp folder)")
    p.add_argument("--severity", default="medium", choices=["low", "medium", "high", "critical"],
                   help="print alerts of this severity and above as they arrive (default medium)")
    p.set_defaults(func=cmd_demo)
