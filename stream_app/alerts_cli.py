"""``lossguard alerts tail``: follow the alert topic, filtered by run and minimum severity."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator

from detectors import Alert, decode_alert, severity_rank
from detectors.events import SchemaError
from producers.kafka_security import client_config

from .oncall import colour, connect

__all__ = ["format_alert", "read_alerts", "add_parser"]

_COLOURS = {"critical": "\033[1;31m", "high": "\033[31m", "medium": "\033[33m", "low": "\033[36m"}


#: control characters (C0, DEL, C1) and bidirectional overrides → a visible escape: a run id must not be
#: able to move the cursor, retitle the terminal or reorder what an operator reads
_ESCAPES = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
            for c in [*range(0x20), *range(0x7f, 0xa0), *range(0x202a, 0x202f), *range(0x2066, 0x206a)]}


def escape_control(text: str) -> str:
    r"""``text`` with control characters shown as escapes.

    >>> escape_control("run\x1b]0;pwned\x07-1")
    'run\\x1b]0;pwned\\x07-1'
    """
    return text.translate(_ESCAPES)


def format_alert(alert: Alert, colour: bool = False) -> str:
    sev = alert.severity.upper()
    if colour:
        sev = f"{_COLOURS[alert.severity]}{sev}\033[0m"
    mark = "RESOLVED " if alert.status == "resolved" else ""
    return escape_control(f"[{alert.run_id}] step {alert.step:>6} ") + sev.ljust(8) + " " + escape_control(
        f"{mark}{alert.alert_type}: {alert.message}")


def read_alerts(bootstrap: str, topic: str, *, from_beginning: bool = True, timeout: float | None = None,
                stop: Callable[[], bool] = lambda: False) -> Iterator[Alert]:
    """Yield alerts from every partition of ``topic`` (no consumer group), until ``timeout`` or ``stop()``."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), **client_config(), enable_auto_commit=False,
                             group_id=None, fetch_max_wait_ms=50, request_timeout_ms=10000)
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        partitions: set[int] | None = None
        while partitions is None:
            partitions = consumer.partitions_for_topic(topic)
            if partitions is None:
                if deadline is not None and time.monotonic() > deadline:
                    return
                time.sleep(0.2)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        if from_beginning:
            consumer.seek_to_beginning(*tps)
        else:
            consumer.seek_to_end(*tps)
        while not stop() and (deadline is None or time.monotonic() < deadline):
            for records in consumer.poll(timeout_ms=200).values():
                for record in records:
                    try:
                        yield decode_alert(record.value)
                    except (SchemaError, ValueError, KeyError):
                        print(f"lossguard: skipped an unreadable alert at offset {record.offset}", file=sys.stderr)
    finally:
        consumer.close()


def cmd_tail(args: argparse.Namespace) -> int:
    from .cli import _settings_from

    settings = _settings_from(args)
    bootstrap = connect(settings.bootstrap or f"127.0.0.1:{settings.broker_port}")
    min_rank = severity_rank(args.severity)
    shown = 0
    paint = colour(sys.stdout) and not args.json
    try:
        for alert in read_alerts(bootstrap, settings.topic("alerts"), from_beginning=not args.new,
                                 timeout=args.timeout):
            if (args.run and alert.run_id not in args.run) or alert.rank < min_rank:
                continue
            print(alert.to_json().decode() if args.json else format_alert(alert, paint), flush=True)
            shown += 1
            if args.max and shown >= args.max:
                break
    except KeyboardInterrupt:
        pass
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    alerts = sub.add_parser("alerts", help="read the alert topic")
    alerts_sub = alerts.add_subparsers(dest="alerts_command", required=True)
    p = alerts_sub.add_parser("tail", parents=[common], help="follow alerts as they arrive")
    p.add_argument("--broker", help="Kafka bootstrap servers (default LOSSGUARD_BOOTSTRAP or 127.0.0.1:9092)")
    p.add_argument("--run", action="append", help="only this run (repeatable)")
    p.add_argument("--severity", default="low", choices=["low", "medium", "high", "critical"],
                   help="minimum severity shown (default low)")
    p.add_argument("--new", action="store_true", help="only alerts that arrive from now on")
    p.add_argument("--max", type=int, help="stop after this many alerts")
    p.add_argument("--timeout", type=float, help="stop after this many seconds")
    p.add_argument("--json", action="store_true", help="print alert events as JSON lines")
    p.set_defaults(func=cmd_tail)
