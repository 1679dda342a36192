"""End to end through a real broker: real torch training → producer → Kafka → Faust worker → alert topic."""

from __future__ import annotations

import pytest

from stream_app.demo_train import train
from tests.conftest import collect_alerts, read_topic

pytestmark = pytest.mark.slow


def test_nan_and_lr_jump_runs_alert_and_the_healthy_run_stays_quiet(topics, start_worker, monkeypatch):
    monkeypatch.setenv("LOSSGUARD_TOPIC_PREFIX", topics.prefix)
    worker = start_worker()
    steps = 200
    results = {scenario: train(f"e2e-{scenario}", scenario, steps=steps, bootstrap=topics.bootstrap)
               for scenario in ("healthy", "lr_jump", "nan")}
    for result in results.values():
        assert result["sent"] == steps + 1 and result["dropped"] == 0  # every step + the closing event

    def done(alerts):
        return ({a.run_id for a in alerts if a.alert_type == "nonfinite_metric"} >= {"e2e-nan"}
                and any(a.run_id == "e2e-lr_jump" and a.rank >= 2 for a in alerts))

    alerts = collect_alerts(topics, done, timeout=90)
    assert done(alerts), f"expected alerts missing; got {[(a.run_id, a.alert_type) for a in alerts]}\n{worker.log()[-3000:]}"

    nan_alert = next(a for a in alerts if a.run_id == "e2e-nan" and a.alert_type == "nonfinite_metric")
    assert nan_alert.severity == "critical"
    assert nan_alert.step == results["nan"]["inject_at"]  # at the very step the NaN appeared

    jump = results["lr_jump"]["inject_at"]
    lr_alerts = [a for a in alerts if a.run_id == "e2e-lr_jump" and a.rank >= 2]
    assert min(a.step for a in lr_alerts) <= jump + 5, "the LR jump must be caught within a few steps"
    assert all(a.step >= jump for a in lr_alerts), "no high/critical alert before the jump"

    # give the worker time to finish the healthy run too, then check it raised nothing serious
    collect_alerts(topics, lambda _: False, timeout=3)
    healthy = [a for a in collect_alerts(topics, lambda _: False, timeout=2) if a.run_id == "e2e-healthy"]
    assert [a for a in healthy if a.rank >= 2] == []


def test_malformed_events_go_to_the_dead_letter_topic_and_processing_continues(topics, start_worker):
    from kafka import KafkaProducer

    start_worker()
    producer = KafkaProducer(bootstrap_servers=topics.bootstrap)
    producer.send(topics.name("metrics"), key=b"bad", value=b"{not json")
    producer.send(topics.name("metrics"), key=b"bad", value=b'{"v":1,"run_id":"bad","step":"x","metrics":{}}')
    producer.send(topics.name("metrics"), key=b"good", value=b'{"v":1,"run_id":"good","step":1,"ts":1,'
                                                             b'"metrics":{"loss":"NaN"}}')
    producer.flush()
    producer.close()
    alerts = collect_alerts(topics, lambda al: any(a.run_id == "good" for a in al), timeout=60)
    assert any(a.run_id == "good" and a.alert_type == "nonfinite_metric" for a in alerts)
    import json

    dead = [json.loads(r.value) for r in read_topic(topics.bootstrap, topics.name("dlq"), topics.partitions, 2)]
    reasons = sorted(d["reason"].split(":")[0] for d in dead)
    assert reasons == ["event", "step"]
    assert {d["original"] for d in dead} == {"{not json", '{"v":1,"run_id":"bad","step":"x","metrics":{}}'}


def test_a_worker_follows_a_metrics_topic_created_with_another_partition_count(topics, start_worker):
    """A job that started before lossguard set up its topics lets the broker pick the partition count;
    the worker must follow it (Faust tables must match their source topic), not dead-letter every record."""
    from kafka import KafkaProducer

    from detectors import MetricEvent

    worker = start_worker(extra_env={"LOSSGUARD_PARTITIONS": "6"})  # the topics were made with 3
    producer = KafkaProducer(bootstrap_servers=topics.bootstrap)
    producer.send(topics.name("metrics"), key=b"early", value=MetricEvent("early", 5, {"loss": float("nan")},
                                                                           ts=1.0).to_json())
    producer.flush()
    producer.close()
    alerts = collect_alerts(topics, lambda al: any(a.run_id == "early" for a in al), timeout=60)
    assert any(a.run_id == "early" and a.alert_type == "nonfinite_metric" for a in alerts), worker.log()[-2000:]
    assert "has 3 partitions, not the configured 6" in worker.log()
    assert read_topic(topics.bootstrap, topics.name("dlq"), topics.partitions, 1) == []
