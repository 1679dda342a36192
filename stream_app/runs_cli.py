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
import os
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

from .aggregates import RunSummary
from .alerts_cli import escape_control
from .oncall import UnknownRun, colour, connect, read_to_end
from .report import render_html, summarize

__all__ = ["add_parser", "known_run", "parse_duration", "read_runs", "write_report"]


def read_runs(bootstrap: str, changelog: str) -> dict[str, RunSummary]:
    """The latest summary of every run, from the ``run_summary`` changelog."""
    runs: dict[str, RunSummary] = {}
    for record in read_to_end(bootstrap, changelog):
        key = json.loads(record.key)
        if record.value is None:
            runs.pop(key, None)
        else:
            runs[key] = RunSummary.from_dict(json.loads(record.value))
    return runs


def _read_alerts(bootstrap: str, topic: str) -> Iterator[Alert]:
    for record in read_to_end(bootstrap, topic):
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
    from .cli import _settings_from

    settings = _settings_from(args)
    if getattr(args, "app_id", None):
        settings.app_id = args.app_id
    return settings, connect(settings.bootstrap or f"127.0.0.1:{settings.broker_port}")


# -- runs / report -------------------------------------------------------------------------------------
_SEVERITY_COLOURS = {"critical": "\033[1;31m", "high": "\033[31m", "medium": "\033[33m", "low": "\033[36m"}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{max(seconds, 0):.0f}s ago"


def cmd_runs(args: argparse.Namespace) -> int:
    settings, bootstrap = _context(args)
    runs = sorted(read_runs(bootstrap, settings.changelog("run_summary")).values(),
                  key=lambda r: r.last_ts or 0, reverse=True)
    if args.json:
        for run in runs:
            print(json.dumps(run.overview()))
        return 0
    paint = colour(sys.stdout)
    now = time.time()
    print(f"{'run':<28} {'last step':>9} {'events':>8} {'crit':>5} {'high':>5} {'med':>5} {'low':>5}  "
          f"{'dup/late/resumed':<16} last seen")
    for run in runs:
        a = run.alerts
        worst = next((sev for sev in ("critical", "high", "medium", "low") if a[sev]), None)
        name = f"{escape_control(run.run_id):<28}"
        if paint and worst:
            name = f"{_SEVERITY_COLOURS[worst]}{name}\033[0m"
        seen = "-" if run.last_ts is None else (
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(run.last_ts))} ({_age(now - run.last_ts)})")
        print(f"{name} {run.last_step if run.last_step is not None else '-':>9} {run.events:>8} "
              f"{a['critical']:>5} {a['high']:>5} {a['medium']:>5} {a['low']:>5}  "
              f"{f'{run.duplicates}/{run.out_of_order}/{run.resumes}':<16} {seen}")
    if not runs:
        print(f"(no runs yet on {settings.changelog('run_summary')})")
    return 0


def known_run(bootstrap: str, settings: Any, run_id: str) -> RunSummary:
    """The run's summary; :class:`UnknownRun` when no worker has seen it."""
    run = read_runs(bootstrap, settings.changelog("run_summary")).get(run_id)
    if run is None:
        raise UnknownRun(run_id, f" (no worker of app {settings.app_id} has seen it; `lossguard runs` lists them)")
    return run


def write_report(bootstrap: str, settings: Any, run_id: str, out: Path | None = None) -> tuple[dict[str, Any], Path]:
    """Write ``run_id``'s HTML report (and its JSON next to it); :class:`UnknownRun` before writing
    anything when no worker has seen the run."""
    from .sinks.jsonl import run_file_stem

    run = known_run(bootstrap, settings, run_id)
    summary = summarize(run_id, _read_alerts(bootstrap, settings.topic("alerts")))
    detail = {**run.overview(), "first_ts": run.first_ts, "windows": run.windows, "history": run.history.to_dict()}
    out = out or Path(f"lossguard-reports/{run_file_stem(run_id)}.report.html")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(summary, detail, settings.detector_config))
    out.with_suffix(".json").write_text(json.dumps({**summary, "run": detail}, indent=2))
    return {**summary, "last_step": run.last_step, "events": run.events}, out


def cmd_report(args: argparse.Namespace) -> int:
    settings, bootstrap = _context(args)
    summary, out = write_report(bootstrap, settings, args.run, Path(args.out) if args.out else None)
    if args.json:
        print(json.dumps({**summary, "html": str(out)}, indent=2))
    else:
        sev = ", ".join(f"{n} {k}" for k, n in summary["by_severity"].items() if n) or "no alerts"
        print(f"run {escape_control(args.run)}: last step {summary['last_step']}, {summary['events']} events; "
              f"{summary['total_alerts']} alerts ({sev}); open: {', '.join(summary['open']) or 'none'}")
        print(f"HTML report: {out}")
    return 0


# -- silences --------------------------------------------------------------------------------------------
def cmd_silence(args: argparse.Namespace) -> int:
    from .sinks.silences import Silence, read_silences, silences_topic, write_silence

    settings, bootstrap = _context(args)
    topic = silences_topic(settings.topic_prefix)
    if args.silence_command == "add":
        silence = Silence.new(duration_s=parse_duration(args.duration), run_id=args.run, alert_type=args.type,
                              severity=args.severity, comment=args.comment or "")
        write_silence(bootstrap, topic, silence)
        print(silence.to_json().decode() if args.json else silence.id)
        return 0
    silences = list(read_silences(bootstrap, topic))
    if args.silence_command == "expire":
        match = next((s for s in silences if s.id == args.id), None)
        if match is None:
            print(f"lossguard: no silence {args.id} (see `lossguard silence list --all`)", file=sys.stderr)
            return 2
        match.expires_at = time.time()
        write_silence(bootstrap, topic, match)
        print(match.to_json().decode() if args.json else f"silence {match.id} expired")
        return 0
    for s in silences:
        if args.all or s.active():
            if args.json:
                print(s.to_json().decode())
                continue
            left = max(0.0, s.expires_at - time.time())
            print(escape_control(f"{s.id}  run={s.run_id} type={s.alert_type} severity<={s.severity}  "
                                 f"{'expires in ' + str(round(left / 60)) + ' min' if left else 'expired'}  "
                                 f"{s.comment}"))
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
        timer = threading.Timer(args.timeout, stop.set)
        timer.daemon = True  # a Ctrl-C before the timeout must not wait it out
        timer.start()
    threads = [threading.Thread(target=r.run, args=(stop,), name=f"sink-{r.sink.name}", daemon=True)
               for r in runners]
    if args.metrics_port:
        from .metrics import SinkMetrics

        try:
            SinkMetrics(runners).serve(args.metrics_port, settings.web_bind)
            print(f"lossguard sinks: metrics at http://{settings.web_bind}:{args.metrics_port}/metrics",
                  file=sys.stderr, flush=True)
        except OSError as exc:
            print(f"lossguard sinks: no /metrics: port {args.metrics_port} on {settings.web_bind}: {exc.strerror}",
                  file=sys.stderr, flush=True)
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
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_report)

    silence = sub.add_parser("silence", help="mute alerts by run, type or severity, with expiry")
    ssub = silence.add_subparsers(dest="silence_command", required=True)
    sil = argparse.ArgumentParser(add_help=False, parents=[conn])
    sil.add_argument("--json", action="store_true", help="print silences as JSON lines")
    p = ssub.add_parser("add", parents=[sil], help="add a silence; prints its id")
    p.add_argument("--run", help="run id or glob (default any)")
    p.add_argument("--type", help="alert type or glob (default any)")
    p.add_argument("--severity", choices=["low", "medium", "high", "critical"],
                   help="silence this severity and below (default any)")
    p.add_argument("--for", dest="duration", default="1h", help="how long: 30m, 2h, 1d (default 1h)")
    p.add_argument("--comment", help="why (shown by silence list)")
    p.set_defaults(func=cmd_silence)
    p = ssub.add_parser("list", parents=[sil], help="active silences")
    p.add_argument("--all", action="store_true", help="expired ones too")
    p.set_defaults(func=cmd_silence)
    p = ssub.add_parser("expire", parents=[sil], help="end a silence now")
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
        p.add_argument("--metrics-port", type=int, default=int(os.environ.get("LOSSGUARD_SINKS_METRICS_PORT", 6068)),
                       help="serve Prometheus /metrics here (default 6068 or LOSSGUARD_SINKS_METRICS_PORT; 0: off)")
        p.set_defaults(func=cmd_sinks)
