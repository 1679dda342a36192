"""Silences as data: records on the compacted ``<prefix>.silences`` topic, keyed by silence id.

A silence mutes alerts that match all of its set matchers — ``run_id`` and ``alert_type`` (shell
globs) and ``severity`` (that severity *or lower*) — until ``expires_at``. ``lossguard silence add``
writes one; ``lossguard silence expire ID`` rewrites it with ``expires_at`` = now; the sinks read the
topic continuously, so a silence takes effect at once in every sink process, and survives restarts.

>>> s = Silence.new(run_id="sweep-*", severity="high", duration_s=3600, now=0.0)
>>> from detectors import Alert
>>> a = Alert.new(run_id="sweep-3", step=1, detector="d", category="c", alert_type="loss_spike",
...               severity="medium", message="")
>>> s.matches(a, now=10.0), s.matches(a, now=4000.0)
(True, False)
"""

from __future__ import annotations

import fnmatch
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from detectors import SEVERITIES, Alert, severity_rank
from detectors.config import ConfigError
from detectors.events import dumps, loads
from producers.kafka_security import client_config

__all__ = ["Silence", "SilenceBook", "silences_topic", "write_silence", "read_silences"]


@dataclass(slots=True)
class Silence:
    id: str
    expires_at: float
    run_id: str = "*"
    alert_type: str = "*"
    #: silences this severity and the ones below it; "critical" silences everything
    severity: str = "critical"
    comment: str = ""
    created_at: float = field(default_factory=time.time)

    @classmethod
    def new(cls, *, duration_s: float, run_id: str | None = None, alert_type: str | None = None,
            severity: str | None = None, comment: str = "", now: float | None = None) -> Silence:
        if severity is not None and severity not in SEVERITIES:
            raise ConfigError("severity", f"expected one of {SEVERITIES}, got {severity!r}")
        if not (run_id or alert_type or severity):
            raise ConfigError("silence", "give at least one of --run, --type, --severity")
        now = time.time() if now is None else now
        return cls(id=uuid.uuid4().hex[:12], expires_at=now + duration_s, run_id=run_id or "*",
                   alert_type=alert_type or "*", severity=severity or "critical", comment=comment,
                   created_at=now)

    def active(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) < self.expires_at

    def matches(self, alert: Alert, now: float | None = None) -> bool:
        return (self.active(now) and fnmatch.fnmatchcase(alert.run_id, self.run_id)
                and fnmatch.fnmatchcase(alert.alert_type, self.alert_type)
                and alert.rank <= severity_rank(self.severity))

    def to_json(self) -> bytes:
        return dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes) -> Silence:
        return cls(**loads(data))


def silences_topic(prefix: str) -> str:
    return f"{prefix}.silences"


def ensure_silences_topic(bootstrap: str, topic: str) -> None:
    """Create the compacted silences topic (1 partition: silences are few, order is simple)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), **client_config(), request_timeout_ms=10000)
    try:
        if topic not in admin.list_topics():
            try:
                admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"cleanup.policy": "compact"})])
            except KafkaError:
                admin.create_topics([NewTopic(topic, 1, 1)])  # a broker without compaction configs
    except KafkaError:
        pass  # created concurrently
    finally:
        admin.close()


def write_silence(bootstrap: str, topic: str, silence: Silence) -> None:
    from kafka import KafkaProducer

    ensure_silences_topic(bootstrap, topic)
    producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), **client_config())
    try:
        producer.send(topic, key=silence.id.encode(), value=silence.to_json()).get(timeout=10)
    finally:
        producer.close()


class SilenceBook:
    """The silences currently on the topic, kept up to date by :meth:`refresh` (non-blocking)."""

    def __init__(self, bootstrap: str, topic: str):
        from kafka import KafkaConsumer, TopicPartition

        ensure_silences_topic(bootstrap, topic)
        self.silences: dict[str, Silence] = {}
        self._consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), **client_config(), group_id=None,
                                       enable_auto_commit=False, fetch_max_wait_ms=10)
        tp = TopicPartition(topic, 0)
        self._consumer.assign([tp])
        self._consumer.seek_to_beginning(tp)
        end = self._consumer.end_offsets([tp])[tp]
        deadline = time.monotonic() + 5.0
        while self._consumer.position(tp) < end and time.monotonic() < deadline:
            self.refresh(timeout_ms=200)

    def refresh(self, timeout_ms: int = 0) -> None:
        for records in self._consumer.poll(timeout_ms=timeout_ms).values():
            for record in records:
                if record.value is None:
                    self.silences.pop(record.key.decode(), None)
                    continue
                try:
                    silence = Silence.from_json(record.value)
                except (ValueError, TypeError):
                    continue
                self.silences[silence.id] = silence

    def silencing(self, alert: Alert, now: float | None = None) -> Silence | None:
        return next((s for s in self.silences.values() if s.matches(alert, now)), None)

    def close(self) -> None:
        self._consumer.close()


def read_silences(bootstrap: str, topic: str) -> Iterator[Silence]:
    """Every silence on the topic (latest version of each), active or expired."""
    book = SilenceBook(bootstrap, topic)
    try:
        yield from sorted(book.silences.values(), key=lambda s: s.created_at)
    finally:
        book.close()
