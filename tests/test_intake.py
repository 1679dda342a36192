"""Total input handling: any record of the metrics topic becomes valid events or a reason for the DLQ.

The property tests (hypothesis) drive :func:`stream_app.intake.read_record` with arbitrary bytes, arbitrary
JSON and near-valid events, and push whatever it accepts through a run's summary and detector suite into the
codec the worker's table writes with (stream_app.saved_state: Faust's JSON, orjson, the chart history from
its cache) — the path the poison records of issue 14 broke.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detectors import DetectorSuite, RunDriver, SchemaError
from detectors.events import encode_metric_batch
from stream_app.aggregates import RunSummary
from stream_app.intake import ORIGINAL_LIMIT, dead_letter_value, read_record
from stream_app.saved_state import STATE_CODEC, SavedState


def record_path(key: bytes | None, value: bytes | None) -> str:
    """What the worker does with one record, up to the state save: 'events' or the dead-letter reason."""
    try:
        events = read_record(key, value)
    except SchemaError as exc:
        reason = str(exc)
        assert reason.split(":", 1)[0] and len(reason) < 3000
        json.loads(dead_letter_value(key, value, reason))  # the envelope is always writable
        return reason
    assert events and all(e.run_id == events[0].run_id for e in events)
    driver = RunDriver(DetectorSuite(), ledger=RunSummary(events[0].run_id, 60.0, 10))  # as the worker's
    for alert in driver.feed(events):
        alert.to_json()
    value = SavedState({**driver.ledger.to_dict(), "suite": driver.suite.state_dict()}, driver.ledger.history)
    assert STATE_CODEC.loads(STATE_CODEC.dumps(value)) == STATE_CODEC.loads(STATE_CODEC.dumps(dict(value)))
    return "events"


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                      st.text(max_size=20), st.sampled_from(["NaN", "Infinity", "-Infinity", "nan"]))
any_json = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                        max_leaves=20)
huge_int = st.one_of(st.integers(min_value=2**63 - 2, max_value=2**70), st.integers(max_value=-(2**63) + 1, min_value=-(2**70)),
                     st.just(10**400), st.just(-(10**309)))
number = st.one_of(st.integers(), st.floats(), huge_int, st.none(), st.sampled_from(["NaN", "Infinity", "x"]))
run_id = st.one_of(st.text(min_size=1, max_size=30), st.just("x\udc80"), st.just("r"))


@st.composite
def near_events(draw) -> dict:
    """Events that are valid or off by one field: hostile numbers, strings, tags, versions."""
    doc = {"run_id": draw(run_id), "step": draw(st.one_of(st.integers(0, 10**6), huge_int, st.floats(), any_json)),
           "ts": draw(st.one_of(st.floats(0, 2e9), number)), "metrics": draw(st.one_of(
               st.dictionaries(st.text(max_size=10), number, max_size=4), any_json))}
    if draw(st.booleans()):
        doc["tags"] = draw(st.one_of(st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=5), any_json), max_size=3),
                                     any_json))
    if draw(st.booleans()):
        doc["v"] = draw(st.one_of(st.just(1), st.just(True), st.just(1.0), st.just(2), any_json))
    return doc


@st.composite
def near_records(draw) -> tuple[bytes | None, bytes]:
    """A single event or a batch of them, JSON-encoded as a lenient writer would (lone surrogates escaped)."""
    if draw(st.booleans()):
        doc = draw(near_events())
    else:
        steps = draw(st.lists(near_events(), min_size=1, max_size=4))
        doc = {"run_id": steps[0].pop("run_id"), "steps": [{k: v for k, v in s.items() if k != "run_id"} for s in steps]}
        if draw(st.booleans()):
            doc["tags"] = draw(st.one_of(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2), any_json))
    raw = json.dumps(doc, allow_nan=True).encode()  # Python writes bare NaN tokens and escaped surrogates
    rid = doc.get("run_id")
    key = draw(st.one_of(st.just(rid.encode("utf-8", "surrogatepass") if isinstance(rid, str) else b"r"),
                         st.none(), st.binary(max_size=5)))
    return key, raw


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.none(), st.binary(max_size=200)), st.one_of(st.none(), st.binary(max_size=400)))
def test_any_bytes_become_events_or_a_reason(key, value):
    record_path(key, value)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(near_records())
def test_any_json_record_becomes_events_or_a_reason(record):
    record_path(*record)


@settings(max_examples=200, deadline=None)
@given(any_json)
def test_any_json_document_becomes_events_or_a_reason(doc):
    record_path(b"r", json.dumps(doc).encode())


POISON = {  # issue 14's records that passed the decoder, or raised out of it, before
    "step over 2**64": (b'{"v":1,"run_id":"r","step":1180591620717411303424,"ts":1.7e9,"metrics":{"loss":1.0}}', "step"),
    "batched step over 2**63": (b'{"v":1,"run_id":"r","steps":[{"step":9223372036854775808,"ts":1.0,"metrics":{}}]}',
                                "steps[0].step"),
    "lone surrogate in run id": (b'{"v":1,"run_id":"x\\udc80","step":1,"ts":1.0,"metrics":{"loss":1.0}}', "event"),
    "lone surrogate in a metric name": (b'{"v":1,"run_id":"r","step":1,"ts":1.0,"metrics":{"\\ud800":1.0}}', "event"),
    "integer metric over 1e308": (b'{"v":1,"run_id":"r","step":1,"ts":1.0,"metrics":{"loss":1' + b"0" * 400 + b"}}",
                                  "metrics.loss"),
    "integer ts over 1e308": (b'{"v":1,"run_id":"r","step":1,"ts":1' + b"0" * 400 + b',"metrics":{}}', "ts"),
    "10k-deep nesting": (b"[" * 10_000 + b"]" * 10_000, "event"),
    "10k-deep metric value": (b'{"run_id":"r","step":1,"metrics":{"loss":' + b"[" * 10_000 + b"]" * 10_000 + b"}}",
                              "event"),
    "batched tags a list": (b'{"v":1,"run_id":"r","steps":[{"step":1,"ts":1.0,"metrics":{},"tags":["a"]}]}',
                            "steps[0].tags"),
    "record tags a list": (b'{"v":1,"run_id":"r","tags":[1],"steps":[{"step":1,"ts":1.0,"metrics":{}}]}', "tags"),
    "tombstone": (None, "event"),
    "v true": (b'{"v":true,"run_id":"r","step":1,"ts":1.0,"metrics":{}}', "v"),
    "v true, batched": (b'{"v":true,"run_id":"r","steps":[{"step":1,"ts":1.0,"metrics":{"loss":1.0}}]}', "steps[0].v"),
    "not UTF-8": (b'{"run_id":"\xff","step":1,"metrics":{}}', "event"),
}


@pytest.mark.parametrize("name", POISON)
def test_issue_14_poison_records_are_rejected_with_a_reason(name):
    value, field = POISON[name]
    with pytest.raises(SchemaError) as info:
        read_record(b"r", value)
    assert info.value.field == field, str(info.value)
    assert record_path(b"r", value).startswith(f"{field}:")


def test_the_kafka_key_must_be_the_run_id():
    good = b'{"v":1,"run_id":"r","step":1,"ts":1.0,"metrics":{"loss":1.0}}'
    assert [e.run_id for e in read_record(b"r", good)] == ["r"]
    for key in (None, b"", b"R", b"r "):
        with pytest.raises(SchemaError, match="^key: "):
            read_record(key, good)


def test_a_null_metric_value_is_nan():
    """Decided: ``null`` is NaN (JSON.stringify writes NaN as null; a metric not logged is left out)."""
    for raw in (b'{"run_id":"r","step":1,"ts":1.0,"metrics":{"loss":null}}',
                b'{"run_id":"r","steps":[{"step":1,"ts":1.0,"metrics":{"loss":null}}]}'):
        (event,) = read_record(b"r", raw)
        assert math.isnan(event.metrics["loss"])
    alerts = DetectorSuite().update_batch(read_record(b"r", b'{"run_id":"r","step":1,"ts":1.0,"metrics":{"loss":null}}'))
    assert [a.alert_type for a in alerts] == ["nonfinite_metric"]


def test_an_oversized_original_is_cut_in_its_dead_letter_with_size_and_hash():
    import base64
    import hashlib

    raw = b'{"run_id":"' + b"a" * 5_000_000 + b'"}'
    with pytest.raises(SchemaError, match="^event: .* over the"):
        read_record(b"k", raw)
    envelope = dead_letter_value(b"k", raw, "event: too big")
    doc = json.loads(envelope)
    assert len(envelope) < 3 * ORIGINAL_LIMIT and doc["truncated"] and doc["size"] == len(raw)
    assert doc["sha256"] == hashlib.sha256(raw).hexdigest()
    assert base64.b64decode(doc["original_b64"]) == raw[:ORIGINAL_LIMIT]
    small = json.loads(dead_letter_value(None, b"{", "event: x"))
    assert "truncated" not in small and base64.b64decode(small["original_b64"]) == b"{" and small["key"] == ""


def test_valid_records_still_decode_unchanged():
    from detectors import MetricEvent

    events = [MetricEvent("r", s, {"loss": 1.0 / (s + 1), "grad_norm": math.nan}, ts=1e9 + s, tags={"a": "b"})
              for s in range(5)]
    back = read_record(b"r", encode_metric_batch(events))
    assert [(e.step, e.ts, e.tags) for e in back] == [(e.step, e.ts, e.tags) for e in events]
