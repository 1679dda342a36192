"""Runs one sink over the alert topic: dedup → silences → routes → policy → deliver → commit.

Each sink has its own consumer group (``<app_id>-sink-<name>``) holding its committed offsets; the
runner assigns itself every partition (no group join, so it starts at once on every broker) and commits
an offset only after the alert at it was delivered — or decided against. On start it replays the alert
log up to the committed offsets through the same pipeline *without* delivering, which rebuilds the
policy's state (ids seen, open groups, cooldowns): a duplicate that a restarted worker appends later is
still recognised, and a restarted sink does not page twice. A sink that keeps state about what it
delivered (Alertmanager's firing alerts, which it re-sends) sees those alerts through ``Sink.replayed``.

A delivery that fails for good (:func:`is_permanent`) is written, with its reason, to the sink's dead
letters — ``dead_letter_dir/<sink>.jsonl``, one ``{"sink", "reason", "ts", "attempts", "alert"}`` a line —
counted as ``dead_lettered``, and committed: one alert can never block a sink. Other failures are retried
with capped exponential backoff until they succeed or the sink is stopped.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from detectors import Alert, SchemaError, decode_alert
from producers.kafka_security import client_config

from ..redact import redact
from ..routing import Router
from . import PermanentDeliveryError, Sink
from .policy import DELIVER, AlertPolicy
from .silences import SilenceBook

__all__ = ["SinkRunner", "Backoff", "is_permanent"]

log = logging.getLogger("lossguard.sinks")


#: file-system errors that the same alert would meet again on every attempt
_PERMANENT_ERRNOS = {errno.ENAMETOOLONG, errno.EINVAL, errno.EISDIR, errno.ENOTDIR, errno.EILSEQ}


def is_permanent(exc: BaseException) -> bool:
    """Whether no retry of the same delivery can succeed: a sink said so, a file name the file system
    refuses, or the alert cannot be encoded for the endpoint."""
    if isinstance(exc, PermanentDeliveryError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _PERMANENT_ERRNOS
    return isinstance(exc, (ValueError, TypeError, UnicodeError))


@dataclass(slots=True)
class Backoff:
    """Exponential backoff between delivery attempts: first, first·factor, … capped at ``max_s``."""

    first_s: float = 0.2
    factor: float = 2.0
    max_s: float = 30.0

    def delay(self, attempt: int) -> float:
        return min(self.max_s, self.first_s * self.factor ** attempt)


@dataclass
class SinkRunner:
    sink: Sink
    bootstrap: str
    topic: str
    group_id: str
    router: Router
    policy: AlertPolicy
    silences: SilenceBook | None = None
    backoff: Backoff = field(default_factory=Backoff)
    #: where permanently undeliverable alerts go (``<sink>.jsonl``); None: only logged and counted
    dead_letter_dir: str | Path | None = None
    #: decisions so far (delivered reasons, duplicate, silenced, unrouted, grouped, cooldown …)
    counts: Counter = field(default_factory=Counter)

    def decide(self, alert: Alert) -> str:
        """Why ``alert`` is (not) delivered to this sink; updates the policy's state."""
        if self.silences is not None and alert.status == "firing" and self.silences.silencing(alert):
            return "silenced"
        if self.sink.name not in self.router.sinks_for(alert):
            return "unrouted"
        return self.policy.admit(alert).reason

    def run(self, stop: threading.Event, max_alerts: int | None = None) -> Counter:
        """Deliver until ``stop`` is set (or ``max_alerts`` were delivered); returns the decision counts."""
        from kafka import KafkaConsumer, TopicPartition
        from kafka.structs import OffsetAndMetadata

        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap.split(","), **client_config(), group_id=self.group_id,
                                 enable_auto_commit=False, fetch_max_wait_ms=20, auto_offset_reset="earliest")
        try:
            partitions = None
            while partitions is None and not stop.is_set():
                partitions = consumer.partitions_for_topic(self.topic)
                if partitions is None:
                    stop.wait(0.5)
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions or ())]
            consumer.assign(tps)
            committed = {tp: consumer.committed(tp) or 0 for tp in tps}
            self._replay(consumer, tps, committed, stop)
            delivered = 0
            while not stop.is_set():
                if self.silences is not None:
                    self.silences.refresh()
                for tp, records in consumer.poll(timeout_ms=200).items():
                    for record in records:
                        if stop.is_set():
                            return self.counts
                        alert = self._decode(record)
                        reason = self.decide(alert) if alert else "unreadable"
                        self.counts[reason] += 1
                        if reason in DELIVER:
                            outcome = self._deliver(alert, reason, stop)
                            if outcome is None:
                                return self.counts  # stopped while the endpoint was down: not committed
                            delivered += outcome
                        consumer.commit({tp: OffsetAndMetadata(record.offset + 1, "", -1)})
                if max_alerts is not None and delivered >= max_alerts:
                    break
            return self.counts
        finally:
            consumer.close(autocommit=False)
            self.sink.close()

    def _replay(self, consumer, tps, committed, stop: threading.Event) -> None:
        pending = {tp for tp in tps if committed[tp] > 0}
        consumer.pause(*(set(tps) - pending))
        if pending:
            consumer.seek_to_beginning(*pending)
        while pending and not stop.is_set():
            for tp, records in consumer.poll(timeout_ms=200).items():
                for record in records:
                    if record.offset < committed[tp] and (alert := self._decode(record)):
                        reason = self.decide(alert)
                        if reason in DELIVER:
                            self.sink.replayed(alert, reason)
            for tp in list(pending):
                if consumer.position(tp) >= committed[tp]:
                    pending.discard(tp)
                    consumer.pause(tp)
        for tp in tps:
            consumer.seek(tp, committed[tp])
        consumer.resume(*tps)

    def _deliver(self, alert: Alert, reason: str, stop: threading.Event) -> bool | None:
        """True: delivered; False: dead-lettered (a permanent failure); None: stopped before either."""
        attempt = 0
        while not stop.is_set():
            try:
                self.sink.deliver(alert, reason)
                self.counts["delivered"] += 1
                return True
            except Exception as exc:  # noqa: BLE001 — any failure of the endpoint: retry or dead-letter
                self.counts["delivery_failed"] += 1
                error = redact(f"{type(exc).__name__}: {exc}")[:1000]
                attempt += 1
                if is_permanent(exc):
                    self._dead_letter(alert, error, attempt)
                    return False
                delay = self.backoff.delay(attempt - 1)
                log.warning("sink %s: %s; retrying in %.1fs", self.sink.name, error, delay)
                stop.wait(delay)
        return None

    def _dead_letter(self, alert: Alert, error: str, attempts: int) -> None:
        self.counts["dead_lettered"] += 1
        log.error("sink %s: alert %s of run %r cannot be delivered (%s); dead-lettered, moving on",
                  self.sink.name, alert.alert_id, alert.run_id[:200], error)
        if self.dead_letter_dir is None:
            return
        line = json.dumps({"sink": self.sink.name, "reason": error, "ts": time.time(), "attempts": attempts,
                           "alert": alert.to_dict()})
        try:
            path = Path(self.dead_letter_dir)
            path.mkdir(parents=True, exist_ok=True)
            with open(path / f"{self.sink.name}.jsonl", "a") as f:
                f.write(line + "\n")
        except OSError as exc:
            log.error("sink %s: could not write its dead letter: %s", self.sink.name, exc)

    @staticmethod
    def _decode(record) -> Alert | None:
        try:
            return decode_alert(record.value)
        except (SchemaError, ValueError, KeyError, TypeError):
            print(f"lossguard: skipped an unreadable alert at offset {record.offset}", file=sys.stderr)
            return None


def wait_all(threads: list[threading.Thread], stop: threading.Event) -> None:
    """Join sink threads, waking up to notice ``stop`` (Ctrl-C in the main thread)."""
    try:
        while any(t.is_alive() for t in threads):
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
