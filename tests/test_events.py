"""The wire contracts: non-finite numbers survive JSON, validation errors name the field."""

from __future__ import annotations

import json
import math

import pytest

from detectors import Alert, ControlEvent, MetricEvent, SchemaError, decode_alert, decode_metric_event
from detectors.events import decode_control_event


@pytest.mark.parametrize("value, wire", [(math.nan, "NaN"), (math.inf, "Infinity"), (-math.inf, "-Infinity")])
def test_nonfinite_metric_round_trips_as_its_string_name(value, wire):
    event = MetricEvent("r1", 7, {"loss": value, "lr": 0.1}, ts=10.0)
    data = event.to_json()
    assert json.loads(data)["metrics"]["loss"] == wire  # any strict JSON reader can parse it
    assert b"null" not in data
    back = decode_metric_event(data)
    if math.isnan(value):
        assert math.isnan(back.metrics["loss"])
    else:
        assert back.metrics["loss"] == value
    assert back.metrics["lr"] == 0.1 and back.step == 7 and back.run_id == "r1"


def test_other_json_writers_are_read_too():
    # Python's json writes bare NaN tokens; a producer in another language might too.
    raw = '{"v": 1, "run_id": "r", "step": 1, "ts": 1.0, "metrics": {"loss": NaN, "x": Infinity}}'
    event = decode_metric_event(raw)
    assert math.isnan(event.metrics["loss"]) and event.metrics["x"] == math.inf


@pytest.mark.parametrize("payload, field", [
    ({"run_id": "", "step": 1, "metrics": {}}, "run_id"),
    ({"run_id": "r", "step": "one", "metrics": {}}, "step"),
    ({"run_id": "r", "step": 1.5, "metrics": {}}, "step"),
    ({"run_id": "r", "step": 1, "metrics": {"loss": [1.0]}}, "metrics.loss"),
    ({"run_id": "r", "step": 1, "metrics": {"loss": "high"}}, "metrics.loss"),
    ({"run_id": "r", "step": 1, "metrics": [1, 2]}, "metrics"),
    ({"run_id": "r", "step": 1, "metrics": {}, "tags": {"host": 3}}, "tags.host"),
    ({"run_id": "r", "step": 1, "metrics": {}, "ts": "yesterday"}, "ts"),
    ({"v": 2, "run_id": "r", "step": 1, "metrics": {}}, "v"),
])
def test_schema_errors_name_the_field(payload, field):
    with pytest.raises(SchemaError) as info:
        decode_metric_event(json.dumps(payload))
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}:")


def test_garbage_and_oversized_input_are_schema_errors():
    with pytest.raises(SchemaError, match="not valid JSON"):
        decode_metric_event(b"\x00\xffnot json")
    big = json.dumps({"run_id": "r", "step": 1, "metrics": {"m": 1}, "tags": {"x": "y" * 2_000_000}})
    with pytest.raises(SchemaError, match="over the"):
        decode_metric_event(big)


def test_alert_round_trip_keeps_nonfinite_values_and_metadata():
    alert = Alert.new(run_id="r", step=5, detector="nonfinite", category="numerics",
                      alert_type="nonfinite_metric", severity="critical", message="loss is NaN",
                      value=math.nan, threshold=math.inf, metadata={"ratio": math.inf})
    back = decode_alert(alert.to_json())
    assert math.isnan(back.value) and back.threshold == math.inf
    assert back.alert_id == alert.alert_id and back.metadata["ratio"] == "Infinity"
    assert back.resolved(9, "ok").alert_id != alert.alert_id


def test_control_event_validates_action():
    event = decode_control_event(ControlEvent("r", "stop", reason="loss diverged").to_json())
    assert event.action == "stop" and event.reason == "loss diverged"
    with pytest.raises(SchemaError) as info:
        decode_control_event(b'{"run_id": "r", "action": "explode"}')
    assert info.value.field == "action"
