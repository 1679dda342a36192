"""``lossguard stop RUN [--reason ...]`` — ask a running job to stop, as the auto-stop sink does.

Writes a control event to ``<prefix>.control`` keyed by the run id; the job's reporter (listening on
that key's partition) sets ``should_stop``, which the HF and Lightning callbacks turn into a clean stop.
``--resume`` withdraws a stop request that the job has not acted on yet.
"""

from __future__ import annotations

import argparse

from detectors.events import ControlEvent
from producers.kafka_security import client_config

from .broker import BrokerError, ensure_topics
from .oncall import connect

__all__ = ["add_parser", "send_control"]

def send_control(event: ControlEvent, bootstrap: str, topic: str, partitions: int, timeout: float = 10.0) -> None:
    """Write ``event`` to ``topic`` keyed by its run id and wait for the broker's ack."""
    from kafka import KafkaProducer

    # Create it up front when missing: a broker that auto-creates topics would pick its own partition count.
    ensure_topics(bootstrap, [topic], partitions)
    producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), **client_config(), acks="all", enable_idempotence=False,
                             max_block_ms=int(timeout * 1000))
    try:
        producer.send(topic, key=event.run_id.encode(), value=event.to_json()).get(timeout=timeout)
    finally:
        producer.close(timeout=timeout)


def cmd_stop(args: argparse.Namespace) -> int:
    from .cli import _settings_from
    from .runs_cli import known_run

    settings = _settings_from(args)
    if args.app_id:
        settings.app_id = args.app_id
    bootstrap = connect(settings.bootstrap or f"127.0.0.1:{settings.broker_port}")  # else the embedded broker's
    if not args.force:
        known_run(bootstrap, settings, args.run_id)  # a mistyped id would stop nothing, silently
    topic = settings.topic("control")
    action = "resume" if args.resume else "stop"
    event = ControlEvent(run_id=args.run_id, action=action, reason=args.reason or f"{action} requested by operator")
    try:
        send_control(event, bootstrap, topic, settings.partitions)
    except Exception as exc:  # noqa: BLE001 — timeouts after the broker answered: say what failed
        raise BrokerError(f"could not write to {topic} at {bootstrap} ({exc.__class__.__name__}: {exc})") from None
    if args.json:
        print(event.to_json().decode())
    else:
        print(f"{action} request for run {args.run_id} written to {topic} at {bootstrap}", flush=True)
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("stop", parents=[common], help="ask a running job to stop (control topic)")
    p.add_argument("run_id", metavar="RUN", help="the run id the job reports under")
    p.add_argument("--reason", help="why; shown in the job's log and as reporter.stop_reason")
    p.add_argument("--resume", action="store_true", help="withdraw an earlier stop request instead")
    p.add_argument("--broker", help="Kafka bootstrap servers (default LOSSGUARD_BOOTSTRAP, else 127.0.0.1:9092)")
    p.add_argument("--app-id", help="the workers' Faust app id, to check the run exists (default lossguard)")
    p.add_argument("--force", action="store_true",
                   help="send even if no worker has seen the run (a job that has not reported yet)")
    p.add_argument("--json", action="store_true", help="print the control event written")
    p.set_defaults(func=cmd_stop)
