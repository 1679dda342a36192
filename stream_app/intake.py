"""What the worker does with a record of the metrics topic before the detectors see it.

Any record — any bytes, any size, any key, a tombstone — either becomes the metric events of one run
(:func:`read_record`) or a :class:`~detectors.SchemaError` whose reason goes, with the record, to the
dead-letter topic (:func:`dead_letter_value`). Nothing else is raised: a record must never stop the agent
for the other runs of its partition.

>>> [e.step for e in read_record(b"r", b'{"run_id":"r","step":3,"ts":1.0,"metrics":{"loss":null}}')]
[3]
>>> read_record(b"other", b'{"run_id":"r","step":3,"ts":1.0,"metrics":{}}')
Traceback (most recent call last):
...
detectors.events.SchemaError: key: expected the record's run id 'r' as its Kafka key, got b'other'
"""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Any

from detectors import MetricEvent, SchemaError
from detectors.events import MAX_RECORD_BYTES, decode_metric_record, dumps

__all__ = ["read_record", "dead_letter_value", "ORIGINAL_LIMIT"]

#: bytes of an original record a dead letter carries (twice: as text and base64); a larger original is cut
#: here, its full size and SHA-256 kept — the envelope must stay under the producer's 1 MiB request limit
ORIGINAL_LIMIT = 64_000


def read_record(key: bytes | None, value: bytes | None, max_bytes: int = MAX_RECORD_BYTES) -> list[MetricEvent]:
    """The events of one metrics record, validated; SchemaError naming the field otherwise. The Kafka key
    must be the run id: it is what puts all of a run's records on the partition that holds its state."""
    events = decode_metric_record(value, max_bytes)
    run_id = events[0].run_id
    if key is None or key != run_id.encode():
        shown = key if key is None or len(key) <= 80 else key[:80] + b"..."
        raise SchemaError("key", f"expected the record's run id {run_id[:80]!r} as its Kafka key, got {shown!r}")
    return events


def dead_letter_value(key: bytes | None, raw: bytes | None, reason: str, limit: int = ORIGINAL_LIMIT,
                      now: float | None = None) -> bytes:
    """The dead-letter record for ``raw``: the reason, when, the key and the original (text and base64),
    cut to ``limit`` bytes with its full size and SHA-256 when it is larger."""
    raw = raw or b""
    key = key or b""
    record: dict[str, Any] = {"reason": reason[:2000], "ts": time.time() if now is None else now,
                              "key": key[:1000].decode("utf-8", "replace"), "size": len(raw),
                              "sha256": hashlib.sha256(raw).hexdigest()}
    if len(raw) > limit:
        record["truncated"] = True
        raw = raw[:limit]
    record["original"] = raw.decode("utf-8", "replace")
    record["original_b64"] = base64.b64encode(raw).decode()
    return dumps(record)
