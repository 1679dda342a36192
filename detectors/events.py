"""Metric and control events: the wire contract between producers, the stream app and the sinks.

A metric event is one training step (or one poll of a managed job) of one run::

    {"v": 1, "run_id": "r1", "step": 12, "ts": 1700000000.0, "source": "torch",
     "metrics": {"loss": 2.31, "grad_norm": "NaN"}, "tags": {"model": "mlp"}}

Non-finite numbers travel as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` so that a NaN
loss survives every JSON library: a NaN is a signal to detect, never a parse error. A metric value of
``null`` is read as NaN too: JavaScript's ``JSON.stringify`` (and other writers) turn a NaN into ``null``,
and a metric that was not logged at a step is left out of ``metrics``, never written as ``null``.

A record is rejected (``SchemaError`` naming the field) when it holds anything the worker's state could
not hold: a step outside the 64-bit range, a number too large for a float, a string that is not valid
UTF-8 (an escaped lone surrogate), nesting deeper than the JSON reader's limit.

>>> e = MetricEvent(run_id="r1", step=3, metrics={"loss": float("nan")}, ts=1.0)
>>> e.to_json()
b'{"v":1,"run_id":"r1","step":3,"ts":1.0,"source":"unknown","metrics":{"loss":"NaN"},"tags":{}}'
>>> decode_metric_event(e.to_json()).metrics["loss"]
nan

A producer that logs many steps a second may pack several steps of ONE run into one record (a schema
extension; ``v`` stays 1). Each item of ``steps`` is a metric event without ``run_id``/``source``; its
own ``tags`` are merged over the record's. A record is all or nothing: one malformed step sends the whole
record to the dead-letter topic with a reason naming it (``steps[3].step: ...``)::

    {"v": 1, "run_id": "r1", "source": "torch", "tags": {"model": "mlp"},
     "steps": [{"step": 10, "ts": 1700000000.0, "metrics": {"loss": 2.31}},
               {"step": 11, "ts": 1700000000.1, "metrics": {"loss": "NaN"}}]}

>>> [e.step for e in decode_metric_record(encode_metric_batch([e, MetricEvent("r1", 4, {}, ts=2.0)]))]
[3, 4]
>>> decode_metric_record(b'{"run_id":"r","steps":[{"step":"x","metrics":{}}]}')
Traceback (most recent call last):
...
detectors.events.SchemaError: steps[0].step: expected an integer, got 'x'

This module is the one owner of the format, for both ends: the producers' sender subprocess (which must
stay light) loads this file by its path and writes records with :func:`encode_event` and
:func:`encode_batch`; the worker reads them with :func:`decode_metric_record`. It therefore imports the
standard library and orjson only, and nothing of its own package.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import itemgetter
from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "SchemaError",
    "MetricEvent",
    "ControlEvent",
    "encode_number",
    "encode_metrics",
    "encode_event",
    "encode_batch",
    "decode_number",
    "decode_metric_event",
    "decode_metric_record",
    "encode_metric_batch",
    "decode_control_event",
    "dumps",
    "loads",
]

SCHEMA_VERSION = 1
#: steps are 64-bit signed integers wherever they are stored (tables, numpy columns, other readers)
MIN_STEP, MAX_STEP = -(2**63), 2**63 - 1
MAX_EVENT_BYTES = 1_000_000
#: a batched record holds many steps, hence its larger limit
MAX_RECORD_BYTES = 4_000_000

try:  # orjson is a dependency and ~5x faster; the stdlib reader is the fallback and reads bare NaN tokens
    from orjson import JSONDecodeError as _FastError
    from orjson import dumps as _fast_dumps
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover
    _FastError, _fast_loads = ValueError, json.loads

    def _fast_dumps(doc: Any) -> bytes:
        return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()

_NONFINITE_OUT = {math.inf: "Infinity", -math.inf: "-Infinity"}
_NONFINITE_IN = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf,
                 "nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class SchemaError(ValueError):
    """An event that does not match the contract. ``field`` names the offending field."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def encode_number(x: float) -> float | str:
    """A float as JSON-safe value: finite numbers unchanged, NaN/±Inf as their string names."""
    if x != x:
        return "NaN"
    return _NONFINITE_OUT.get(x, x)


def encode_metrics(metrics: dict[str, float]) -> dict[str, float | str]:
    """Float metric values in their wire form: the same dict when every value is finite (one sum in C
    tells), else a copy with NaN/±Inf as their string names."""
    total = sum(metrics.values())
    if total - total == 0:  # every value finite (a NaN or an infinity makes the sum non-finite)
        return metrics
    return {k: encode_number(v) for k, v in metrics.items()}


def encode_event(run_id: str, step: int, ts: float, source: str, metrics: dict[str, float],
                 tags: dict[str, str]) -> bytes:
    """The record of one metric event (float ``metrics``; non-finite values are written by name).

    >>> encode_event("r", 3, 1.5, "torch", {"loss": float("nan")}, {})
    b'{"v":1,"run_id":"r","step":3,"ts":1.5,"source":"torch","metrics":{"loss":"NaN"},"tags":{}}'
    """
    return _fast_dumps({"v": SCHEMA_VERSION, "run_id": run_id, "step": step, "ts": ts, "source": source,
                        "metrics": encode_metrics(metrics), "tags": tags})


def encode_batch(run_id: str, source: str, tags: dict[str, str],
                 steps: Iterable[tuple[int, float, dict[str, float], dict[str, str]]]) -> bytes:
    """The batched record of several steps of one run: ``(step, ts, metrics, tags)`` each, a step's own
    tags written only where they differ from the record's."""
    entries = []
    for step, ts, metrics, step_tags in steps:
        entry = {"step": step, "ts": ts, "metrics": encode_metrics(metrics)}
        if step_tags != tags:
            entry["tags"] = step_tags
        entries.append(entry)
    return _fast_dumps({"v": SCHEMA_VERSION, "run_id": run_id, "source": source, "tags": tags, "steps": entries})


def decode_number(value: Any, field_name: str) -> float:
    """Read a metric value from its JSON form (``null`` is NaN: see the module's docstring); raise
    SchemaError naming ``field_name`` otherwise."""
    if value is None:
        return math.nan
    if isinstance(value, bool):
        raise SchemaError(field_name, f"expected a number, got {_short(value)}")
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:
            raise SchemaError(field_name, f"{_short(value)} is too large for a float") from None
    if isinstance(value, str) and value in _NONFINITE_IN:
        return _NONFINITE_IN[value]
    raise SchemaError(field_name, f"expected a number or 'NaN'/'Infinity'/'-Infinity', got {_short(value)}")


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes; refuses bare NaN tokens (encode them with :func:`encode_number` first)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def loads(data: bytes | str) -> Any:
    return json.loads(data)


@dataclass(slots=True)
class MetricEvent:
    """One step of one run. ``metrics`` holds floats (NaN/Inf allowed); ``tags`` holds strings."""

    run_id: str
    step: int
    metrics: dict[str, float]
    ts: float = field(default_factory=time.time)
    source: str = "unknown"
    tags: dict[str, str] = field(default_factory=dict)
    v: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": self.v,
            "run_id": self.run_id,
            "step": self.step,
            "ts": self.ts,
            "source": self.source,
            "metrics": {k: encode_number(float(x)) for k, x in self.metrics.items()},
            "tags": dict(self.tags),
        }

    def to_json(self) -> bytes:
        return encode_event(self.run_id, self.step, self.ts, self.source, _floats(self.metrics), self.tags)

    @classmethod
    def from_dict(cls, d: Any) -> MetricEvent:
        if not isinstance(d, dict):
            raise SchemaError("event", f"expected a JSON object, got {type(d).__name__}")
        v = d.get("v", SCHEMA_VERSION)
        if type(v) is not int or v != SCHEMA_VERSION:
            raise SchemaError("v", f"unsupported schema version {_short(v)} (this reader knows {SCHEMA_VERSION})")
        run_id = d.get("run_id")
        if not isinstance(run_id, str) or not run_id:
            raise SchemaError("run_id", f"expected a non-empty string, got {_short(run_id)}")
        step = d.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            if isinstance(step, float) and step.is_integer():
                step = int(step)
            else:
                raise SchemaError("step", f"expected an integer, got {_short(step)}")
        if not MIN_STEP <= step <= MAX_STEP:
            raise SchemaError("step", f"{_short(step)} is outside the 64-bit integer range")
        ts = d.get("ts", None)
        if ts is None:
            ts = time.time()
        else:
            try:
                if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
                    raise OverflowError
                ts = float(ts)
            except OverflowError:
                raise SchemaError("ts", f"expected unix seconds as a finite number, got {_short(ts)}") from None
        source = d.get("source", "unknown")
        if not isinstance(source, str):
            raise SchemaError("source", f"expected a string, got {_short(source)}")
        raw_metrics = d.get("metrics")
        if not isinstance(raw_metrics, dict):
            raise SchemaError("metrics", f"expected an object of name → number, got {_short(raw_metrics)}")
        metrics = {}
        for name, value in raw_metrics.items():
            metrics[name] = decode_number(value, f"metrics.{name}")
        raw_tags = d.get("tags") or {}
        if not isinstance(raw_tags, dict):
            raise SchemaError("tags", f"expected an object of name → string, got {_short(raw_tags)}")
        tags = {}
        for name, value in raw_tags.items():
            if not isinstance(value, str):
                raise SchemaError(f"tags.{name}", f"expected a string, got {_short(value)}")
            tags[name] = value
        return cls(run_id=run_id, step=step, metrics=metrics, ts=ts, source=source, tags=tags, v=v)


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (a reason must stay readable, whatever was sent); an
    integer too long for ``repr`` is described by its sign and size."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except RecursionError:
        return f"a deeply nested {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + "…"


def _parse(data: bytes | str | None, max_bytes: int = MAX_EVENT_BYTES) -> Any:
    if data is None:
        raise SchemaError("event", "an empty record (a tombstone: null value)")
    if len(data) > max_bytes:
        raise SchemaError("event", f"{len(data)} bytes is over the {max_bytes}-byte limit")
    try:
        return _fast_loads(data)
    except _FastError:
        pass  # bare NaN tokens are off-contract, but a NaN is a signal: the stdlib reader accepts them
    try:
        doc = loads(data)
    except RecursionError:
        raise SchemaError("event", "nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise SchemaError("event", f"not valid JSON ({str(exc)[:200]})") from None
    # what orjson refused and the stdlib read: strings must be valid UTF-8 (no escaped lone surrogates),
    # numbers must fit a float — or no serializer can write the run's state back
    try:
        json.dumps(doc, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise SchemaError("event", "a string holds an escaped lone surrogate (not valid UTF-8)") from None
    except (RecursionError, ValueError):
        raise SchemaError("event", "nested too deeply") from None
    return doc


def decode_metric_event(data: bytes | str) -> MetricEvent:
    """Parse and validate a metric event from its wire bytes."""
    return MetricEvent.from_dict(_parse(data))


def decode_metric_record(data: bytes | str, max_bytes: int = MAX_RECORD_BYTES) -> list[MetricEvent]:
    """The metric events of one record — a single event or a batch of one run's steps — validated."""
    doc = _parse(data, max_bytes)
    if not isinstance(doc, dict) or "steps" not in doc:
        if len(data) > MAX_EVENT_BYTES:
            raise SchemaError("event", f"{len(data)} bytes is over the {MAX_EVENT_BYTES}-byte limit")
        return [MetricEvent.from_dict(doc)]
    steps = doc["steps"]
    if not isinstance(steps, list) or not steps:
        raise SchemaError("steps", f"expected a non-empty list of steps, got {_short(steps)}")
    events = _plain_steps(doc, steps)
    if events is not None:
        return events
    run = {k: doc[k] for k in ("v", "run_id", "source") if k in doc}
    tags = doc.get("tags") or {}
    if not isinstance(tags, dict):
        raise SchemaError("tags", f"expected an object of name → string, got {_short(tags)}")
    events = []
    for i, item in enumerate(steps):
        if not isinstance(item, dict):
            raise SchemaError(f"steps[{i}]", f"expected an object, got {_short(item)}")
        merged: dict[str, Any] = {**item, **run}
        own = item.get("tags") or {}
        if not isinstance(own, dict):
            raise SchemaError(f"steps[{i}].tags", f"expected an object of name → string, got {_short(own)}")
        if tags:
            merged["tags"] = {**tags, **own}
        try:
            events.append(MetricEvent.from_dict(merged))
        except SchemaError as exc:
            raise SchemaError(f"steps[{i}].{exc.field}", exc.reason) from None
    return events


def _plain_steps(doc: dict[str, Any], steps: list[Any]) -> list[MetricEvent] | None:
    """The events of a batched record in the plain form producers write — float times and values, no
    per-step tags — read without the per-field checks (which they would pass); None: anything else,
    which the validating path reads (and rejects with a reason when it is malformed)."""
    run_id, source, tags = doc.get("run_id"), doc.get("source", "unknown"), doc.get("tags") or {}
    v = doc.get("v", SCHEMA_VERSION)
    if (type(v) is not int or v != SCHEMA_VERSION or type(run_id) is not str or not run_id
            or type(source) is not str or type(tags) is not dict
            or any(type(value) is not str for value in tags.values())):
        return None
    tags = dict(tags)  # one copy, shared by the record's events (nothing changes an event's tags)
    # every check in C (map, set, sum) over the record at once: items that are dicts of exactly step, ts
    # and metrics (no per-step tags), int steps, finite float times, float values
    if set(map(type, steps)) != _DICT or set(map(len, steps)) != _THREE:
        return None
    try:
        numbers, times, metrics = (list(map(itemgetter(key), steps)) for key in ("step", "ts", "metrics"))
    except KeyError:
        return None
    if (set(map(type, numbers)) != _INT or min(numbers) < MIN_STEP or max(numbers) > MAX_STEP
            or set(map(type, times)) != _FLOAT or not math.isfinite(sum(times))
            or set(map(type, metrics)) != _DICT
            or not set(map(type, chain.from_iterable(map(dict.values, metrics)))) <= _FLOAT):
        return None
    return list(map(MetricEvent, repeat(run_id), numbers, metrics, times, repeat(source), repeat(tags),
                    repeat(SCHEMA_VERSION)))


_DICT, _THREE, _INT, _FLOAT = {dict}, {3}, {int}, {float}


def encode_metric_batch(events: list[MetricEvent]) -> bytes:
    """One batched record for several steps of a single run."""
    first = events[0]
    if any(e.run_id != first.run_id for e in events):
        raise ValueError("a batch record holds the steps of one run")
    return encode_batch(first.run_id, first.source, first.tags,
                        [(e.step, e.ts, _floats(e.metrics), e.tags) for e in events])


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    """``metrics`` with float values (the same dict when they are)."""
    if set(map(type, metrics.values())) <= _FLOAT:
        return metrics
    return {k: float(x) for k, x in metrics.items()}


@dataclass(slots=True)
class ControlEvent:
    """A request to a running job's producer, e.g. stop after an alert."""

    run_id: str
    action: str
    reason: str = ""
    alert_id: str = ""
    v: int = SCHEMA_VERSION

    ACTIONS = ("stop", "resume")

    def to_dict(self) -> dict[str, Any]:
        return {"v": self.v, "run_id": self.run_id, "action": self.action,
                "reason": self.reason, "alert_id": self.alert_id}

    def to_json(self) -> bytes:
        return dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: Any) -> ControlEvent:
        if not isinstance(d, dict):
            raise SchemaError("event", f"expected a JSON object, got {type(d).__name__}")
        for name in ("run_id", "action"):
            if not isinstance(d.get(name), str) or not d.get(name):
                raise SchemaError(name, f"expected a non-empty string, got {d.get(name)!r}")
        if d["action"] not in cls.ACTIONS:
            raise SchemaError("action", f"expected one of {cls.ACTIONS}, got {d['action']!r}")
        return cls(run_id=d["run_id"], action=d["action"], reason=str(d.get("reason", "")),
                   alert_id=str(d.get("alert_id", "")), v=d.get("v", SCHEMA_VERSION))


def decode_control_event(data: bytes | str) -> ControlEvent:
    return ControlEvent.from_dict(_parse(data))
