"""Metric records on the wire: a single metric event, or a *batch* of steps of one run in one record.

A single event is the contract of ``detectors.events`` (``{"v": 1, "run_id", "step", "ts", "source",
"metrics", "tags"}``). A per-record cost dominates Faust (~10k records/s whatever the agent does,
STACK_NOTES.md), so a producer that logs many steps a second may pack several steps of one run into one
record — **schema extension, v stays 1**::

    {"v": 1, "run_id": "r1", "source": "torch", "tags": {"model": "mlp"},
     "steps": [{"step": 10, "ts": 1700000000.0, "metrics": {"loss": 2.31}},
               {"step": 11, "ts": 1700000000.1, "metrics": {"loss": "NaN"}}]}

Each item of ``steps`` is a metric event without ``run_id``/``source``/``tags`` (it may carry its own
``tags``; they are merged over the record's). Steps are in the order they were logged; the record is
keyed by ``run_id`` like single events. A record is all or nothing: one malformed step sends the whole
record to the dead-letter topic with a reason naming it (``steps[3].step: ...``).

>>> [e.step for e in decode_metric_record(b'{"run_id":"r","steps":[{"step":1,"ts":1,"metrics":{}},'
...                                        b'{"step":2,"ts":2,"metrics":{"loss":"NaN"}}]}')]
[1, 2]
>>> decode_metric_record(b'{"run_id":"r","steps":[{"step":"x","metrics":{}}]}')
Traceback (most recent call last):
...
detectors.events.SchemaError: steps[0].step: expected an integer, got 'x'
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from detectors import MetricEvent, SchemaError

__all__ = ["MAX_RECORD_BYTES", "decode_metric_record", "encode_metric_batch"]

#: records over this size go to the dead-letter topic unread (a batch holds many steps, hence 4 MB)
MAX_RECORD_BYTES = 4_000_000
_RUN_FIELDS = ("v", "run_id", "source")


def decode_metric_record(data: bytes, max_bytes: int = MAX_RECORD_BYTES) -> list[MetricEvent]:
    """The metric events of one record (a single event or a batch), validated; SchemaError otherwise."""
    if len(data) > max_bytes:
        raise SchemaError("event", f"{len(data)} bytes is over the {max_bytes}-byte limit")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        doc = _lenient_loads(data)  # bare NaN tokens: off-contract but a NaN is a signal, as before
    if not isinstance(doc, dict) or "steps" not in doc:
        return [MetricEvent.from_dict(doc)]
    steps = doc["steps"]
    if not isinstance(steps, list) or not steps:
        raise SchemaError("steps", f"expected a non-empty list of steps, got {steps!r:.80}")
    run = {k: doc[k] for k in _RUN_FIELDS if k in doc}
    tags = doc.get("tags") or {}
    events = []
    for i, item in enumerate(steps):
        if not isinstance(item, dict):
            raise SchemaError(f"steps[{i}]", f"expected an object, got {item!r:.80}")
        merged: dict[str, Any] = {**item, **run}
        if tags:
            merged["tags"] = {**tags, **(item.get("tags") or {})}
        try:
            events.append(MetricEvent.from_dict(merged))
        except SchemaError as exc:
            raise SchemaError(f"steps[{i}].{exc.field}", exc.reason) from None
    return events


def _lenient_loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SchemaError("event", f"not valid JSON ({exc})") from None


def encode_metric_batch(events: list[MetricEvent]) -> bytes:
    """One batch record for events of a single run (what a batching producer sends)."""
    first = events[0]
    if any(e.run_id != first.run_id for e in events):
        raise ValueError("a batch record holds the steps of one run")
    doc = {"v": first.v, "run_id": first.run_id, "source": first.source, "tags": dict(first.tags),
           "steps": [{"step": e.step, "ts": e.ts, "metrics": e.to_dict()["metrics"],
                      **({"tags": e.tags} if e.tags != first.tags else {})} for e in events]}
    return orjson.dumps(doc)
