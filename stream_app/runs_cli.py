"""``lossguard runs | report RUN | silence ... | sinks | sink NAME`` — reading and acting on the stream.

    lossguard runs                      every run: last step, events, alerts by severity (run_summary)
    lossguard report RUN                summary report (JSON) + an HTML report file
    lossguard silence add --run R --type T --severity S --for 2h [--comment C]
    lossguard silence list [--all]      active (or all) silences
    lossguard silence expire ID
    lossguard sinks [--routes FILE]     run every configured sink (console, JSONL, webhook, auto-stop)
    lossguard sink NAME                 run one of them

``runs`` and ``report`` read the worker's changelog topic of the ``run_summary`` table (every partition,
no worker or web server needed) and the alert topic.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from detectors import Alert, SchemaError, decode_alert
from detectors.config import ConfigError
from producers.kafka_security import client_config

from .aggregates import RunSummary
from .report import render_html, summarize

__all__ = ["add_parser", "read_records", "read_runs", "parse_duration"]


def read_records(bootstrap: str, topic: str, quiet_s: float = 0.5) -> Iterator[Any]:
    """Every record on ``topic`` now; stops once past the end offsets and quiet for ``quiet_s``
    (the embedded broker under-reports end offsets, STACK_NOTES.md)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), **client_config(), group_id=None, enable_auto_commit=False,
                             fetch_max_wait_ms=50)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        quiet_since = time.monotonic()
        while (any(consumer.position(tp) < end[tp] for tp in tps)
               or time.monotonic() - quiet_since < quiet_s):
            batch = consumer.poll(timeout_ms=100)
            for records in batch.values():
                quiet_since = time.monotonic()
                yield from records
    finally:
        consumer.close()


def read_runs(bootstrap: str, changelog: str) -> dict[str, RunSummary]:
    """The latest summary of every run, from the ``run_summary`` changelog."""
    runs: dict[str, RunSummary] = {}
    for record in read_records(bootstrap, changelog):
        key = json.loads(record.key)
        if record.value is None:
            runs.pop(key, None)
        else:
            runs[key] = RunSummary.from_dict(json.loads(record.value))
    return runs


def _read_alerts(bootstrap: str, topic: str) -> Iterator[Alert]:
    for record in read_records(bootstrap, topic):
        try:
            yield decode_alert(record.value)
        except (SchemaError, ValueError, KeyError):
            continue


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h``, ``1d`` → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise ConfigError("--for", f"expected a duration like 30m, 2h or 1d, got {text!r}")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def _context(args: argparse.Namespace):
    from .cli import _settings_from, resolve_bootstrap

    settings = _settings_from(args)
    if getattr(args, "app_id", None):
        settings.app_id = args.app_id
    bootstrap, _ = resolve_bootstrap(settings, start_embedded=False)
    return settings, bootstrap


# -- runs / report -------------------------------------------------------------------------------------
def cmd_runs(args: argparse.Namespace) -> int:
    settings, bootstrap = _context(args)
    runs = sorted(read_runs(bootstrap, settings.changelog("run_summary")).values(),
                  key=lambda r: r.last_ts or 0, reverse=True)
    if args.json:
        for run in runs:
            print(json.dumps(run.overview()))
        return 0
    print(f"{'run':<28} {'last step':>9} {'events':>8} {'crit':>5} {'high':>5} {'med':>5} {'low':>5}  "
          f"{'dup/late/resumed':<16} last seen")
    for run in runs:
        a = run.alerts
        seen = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.last_ts)) if run.last_ts else "-"
        print(f"{run.run_id:<28} {run.last_step if run.last_step is not None else '-':>9} {run.events:>8} "
              f"{a['critical']:>5} {a['high']:>5} {a['medium']:>5} {a['low']:>5}  "
              f"{f'{run.duplicates}/{run.out_of_order}/{run.resumes}':<16} {seen}")
    if not runs:
        print(f"(no runs yet on {settings.changelog('run_summary')})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    settings, bootstrap = _context(args)
    summary = summarize(args.run, _read_alerts(bootstrap, settings.topic("alerts")))
    run = read_runs(bootstrap, settings.changelog("run_summary")).get(args.run)
    detail = {**run.overview(), "windows": run.windows} if run else None
    from .sinks.jsonl import run_file_stem

    out = Path(args.out or f"lossguard-reports/{run_file_stem(args.run)}.report.html")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(summary, detail))
    out.with_suffix(".json").write_text(json.dumps({**summary, "run": detail}, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"HTML report: {out}", file=sys.stderr)
    return 0 if run or summary["total_alerts"] else 1


# -- silences --------------------------------------------------------------------------------------------
def cmd_silence(args: argparse.Namespace) -> int:
    from .sinks.silences import Silence, read_silences, silences_topic, write_silence

    settings, bootstrap = _context(args)
    topic = silences_topic(settings.topic_prefix)
    if args.silence_command == "add":
        silence = Silence.new(duration_s=parse_duration(args.duration), run_id=args.run, alert_type=args.type,
                              severity=args.severity, comment=args.comment or "")
        write_silence(bootstrap, topic, silence)
        print(silence.id)
        return 0
    silences = list(read_silences(bootstrap, topic))
    if args.silence_command == "expire":
        match = next((s for s in silences if s.id == args.id), None)
        if match is None:
            print(f"lossguard: no silence {args.id} (see `lossguard silence list --all`)", file=sys.stderr)
            return 1
        match.expires_at = time.time()
        write_silence(bootstrap, topic, match)
        return 0
    for s in silences:
        if args.all or s.active():
            left = max(0.0, s.expires_at - time.time())
            print(f"{s.id}  run={s.run_id} type={s.alert_type} severity<={s.severity}  "
                  f"{'expires in ' + str(round(left / 60)) + ' min' if left else 'expired'}  {s.comment}")
    return 0


# -- sinks -----------------------------------------------------------------------------------------------
def cmd_sinks(args: argparse.Namespace) -> int:
    from .routing import load_routing
    from .sinks import build_sink
    from .sinks.policy import AlertPolicy
    from .sinks.runner import SinkRunner, wait_all
    from .sinks.silences import SilenceBook, silences_topic

    settings, bootstrap = _context(args)
    routing = load_routing(args.routes or settings.routes, settings.webhook_url)
    names = args.only or list(routing.sinks)
    for name in names:
        if name not in routing.sinks:
            raise ConfigError("sink", f"no sink named {name!r} (configured: {', '.join(routing.sinks)})")
    runners = []
    for name in names:
        options = routing.sinks[name]
        sink = build_sink(name, options, {"settings": settings, "bootstrap": bootstrap})
        policy = AlertPolicy(group_by_run=bool(options.get("group_by_run", sink.paging)),
                             cooldown_s=float(options.get("cooldown_s", 300.0 if sink.paging else 0.0)))
        runners.append(SinkRunner(sink, bootstrap, settings.topic("alerts"), f"{settings.app_id}-sink-{name}",
                                  routing.router, policy, SilenceBook(bootstrap, silences_topic(settings.topic_prefix)),
                                  dead_letter_dir=Path(settings.alerts_dir) / "dead-letters"))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.timeout:
        threading.Timer(args.timeout, stop.set).start()
    threads = [threading.Thread(target=r.run, args=(stop,), name=f"sink-{r.sink.name}", daemon=True)
               for r in runners]
    print(f"lossguard sinks on {bootstrap}: {', '.join(names)} ← {settings.topic('alerts')}", file=sys.stderr,
          flush=True)
    for t in threads:
        t.start()
    wait_all(threads, stop)
    for r in runners:
        print(f"sink {r.sink.name}: {dict(r.counts)}", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    conn = argparse.ArgumentParser(add_help=False, parents=[common])
    conn.add_argument("--broker", help="Kafka bootstrap servers (default LOSSGUARD_BOOTSTRAP or 127.0.0.1:9092)")
    conn.add_argument("--app-id", help="the workers' Faust app id (default lossguard)")

    p = sub.add_parser("runs", parents=[conn], help="list runs: last step, events, alerts by severity")
    p.add_argument("--json", action="store_true", help="one JSON object per run")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("report", parents=[conn], help="a run's summary report and HTML report file")
    p.add_argument("run", help="run id")
    p.add_argument("--out", help="HTML file (default lossguard-reports/RUN.report.html; JSON next to it)")
    p.set_defaults(func=cmd_report)

    silence = sub.add_parser("silence", help="mute alerts by run, type or severity, with expiry")
    ssub = silence.add_subparsers(dest="silence_command", required=True)
    p = ssub.add_parser("add", parents=[conn], help="add a silence; prints its id")
    p.add_argument("--run", help="run id or glob (default any)")
    p.add_argument("--type", help="alert type or glob (default any)")
    p.add_argument("--severity", choices=["low", "medium", "high", "critical"],
                   help="silence this severity and below (default any)")
    p.add_argument("--for", dest="duration", default="1h", help="how long: 30m, 2h, 1d (default 1h)")
    p.add_argument("--comment", help="why (shown by silence list)")
    p.set_defaults(func=cmd_silence)
    p = ssub.add_parser("list", parents=[conn], help="active silences")
    p.add_argument("--all", action="store_true", help="expired ones too")
    p.set_defaults(func=cmd_silence)
    p = ssub.add_parser("expire", parents=[conn], help="end a silence now")
    p.add_argument("id")
    p.set_defaults(func=cmd_silence)

    for name, help_text in (("sinks", "run the alert sinks (routing config: --routes / LOSSGUARD_ROUTES)"),
                            ("sink", "run one alert sink by name")):
        p = sub.add_parser(name, parents=[conn], help=help_text)
        if name == "sink":
            p.add_argument("only", nargs=1, metavar="NAME", help="sink name from the routing config")
        else:
            p.add_argument("--only", action="append", help="only this sink (repeatable)")
        p.add_argument("--routes", help="sinks and routes TOML file")
        p.add_argument("--timeout", type=float, help="stop after this many seconds")
        p.set_defaults(func=cmd_sinks)
