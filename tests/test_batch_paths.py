"""The record-level fast paths read and count exactly what the step-by-step paths do.

A producer's batch (plain floats, one source and tag set, steps in order) is decoded without per-field
checks and added to the run summary in one pass per metric; anything else takes the validating,
step-by-step way. Both must agree: same events, same summary state, on records of both kinds.
"""

from __future__ import annotations

import json
import math
import random

from detectors import MetricEvent
from detectors.events import decode_metric_record, encode_metric_batch
from stream_app.aggregates import RunSummary


def records(seed: int) -> list[bytes]:
    """One run's batched records: mostly plain, some with NaNs, int values, per-step tags, resumed or
    repeated steps, late steps and window boundaries inside a record."""
    rng = random.Random(seed)
    out, step, ts = [], 0, 1e9
    for _ in range(60):
        events = []
        for _ in range(rng.randint(1, 30)):
            step += 1 if rng.random() > 0.01 else -rng.randint(1, 8)
            ts += rng.choice([0.5] * 20 + [0.0, 40.0]) * (1 if rng.random() > 0.01 else -1)
            metrics = {"loss": 2.0 * rng.random(), "lr": 1e-3, "grad_norm": rng.random()}
            if rng.random() < 0.01:
                metrics[rng.choice(list(metrics))] = rng.choice([math.nan, math.inf])
            if rng.random() < 0.05:
                metrics["val_loss"] = rng.random()
            tags = {"model": "m"} if rng.random() > 0.005 else {"model": "m", "status": "resumed"}
            events.append(MetricEvent("run", step, metrics, ts=ts, source="torch", tags=tags))
        raw = encode_metric_batch(events)
        if rng.random() < 0.1:  # an integer value: valid, but not the plain form
            raw = raw.replace(b'"lr":0.001', b'"lr":1', 1)
        out.append(raw)
    return out


def slow_decode(raw: bytes) -> list[MetricEvent]:
    doc = json.loads(raw)
    run = {k: doc[k] for k in ("v", "run_id", "source")}
    return [MetricEvent.from_dict({**item, **run, "tags": {**doc["tags"], **item.get("tags", {})},
                                   "metrics": {k: v for k, v in item["metrics"].items()}})
            for item in doc["steps"]]


def test_plain_records_decode_to_the_validated_events() -> None:
    for raw in records(1):
        fast = decode_metric_record(raw)
        assert [repr(e) for e in fast] == [repr(e) for e in slow_decode(raw)]


def test_one_pass_summary_equals_the_step_by_step_summary() -> None:
    for seed in range(8):
        one_pass, stepwise, fast_records = RunSummary("run", 60.0, 5), RunSummary("run", 60.0, 5), 0
        for raw in records(seed):
            events = decode_metric_record(raw)
            if one_pass.observe_new(events):
                fast_records += 1
            else:
                for event in events:
                    one_pass.observe(event)
            for event in events:
                stepwise.observe(event)
            assert json.dumps(one_pass.to_dict(), sort_keys=True) == json.dumps(stepwise.to_dict(), sort_keys=True)
        assert fast_records > 10  # the fast path was really taken


def test_a_run_whose_first_loss_is_not_finite_takes_its_next_steps_either_way() -> None:
    # the NaN leaves the loss series empty; the next single step read its last point and raised IndexError,
    # so the worker dead-lettered every later record of the run (its restored state had the same empty series)
    for later in ([MetricEvent("run", 2, {"loss": 1.0}, ts=2.0)],
                  [MetricEvent("run", 2, {"loss": 1.0}, ts=2.0), MetricEvent("run", 3, {"loss": 0.5}, ts=3.0)]):
        summary = RunSummary("run", 60.0, 5)
        summary.observe(MetricEvent("run", 1, {"loss": float("nan")}, ts=1.0))
        restored = RunSummary.from_dict(json.loads(json.dumps(summary.to_dict())))
        for run in (summary, restored):
            for event in later:
                assert run.observe(event) == "new"
            assert run.history.series["loss"][0] == (2, 1.0) and run.history.nonfinite["loss"] == [1]
