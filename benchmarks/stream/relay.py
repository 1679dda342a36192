"""The latency floors (run by benchmarks/stream/single_event.py): the least a detector can be — read each
metric event, and for a NaN loss publish a critical alert — as a plain Faust agent and as raw aiokafka.

Usage: relay.py faust|aiokafka BOOTSTRAP METRICS ALERTS APP_ID — runs until killed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile

kind, bootstrap, metrics_name, alerts_name, app_id = sys.argv[1:6]


def alert_for(raw: bytes) -> bytes | None:
    event = json.loads(raw)
    if event["metrics"].get("loss") != "NaN":
        return None
    return json.dumps({"v": 1, "run_id": event["run_id"], "step": event["step"], "severity": "critical",
                       "status": "firing", "alert_type": "nonfinite_metric"}).encode()


async def aiokafka_relay() -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                fetch_max_wait_ms=10)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await consumer.start()
    await producer.start()
    consumer.assign([TopicPartition(metrics_name, p) for p in consumer.partitions_for_topic(metrics_name)])
    await consumer.seek_to_end()
    print("relay ready", flush=True)
    while True:
        for records in (await consumer.getmany(timeout_ms=1000)).values():
            for record in records:
                alert = alert_for(record.value)
                if alert is not None:
                    await producer.send(alerts_name, key=record.key, value=alert)


def faust_relay() -> None:
    import faust

    from stream_app import faust_fixes

    faust_fixes.install(10)  # the same fetch wait as the lossguard worker
    app = faust.App(app_id, broker=f"kafka://{bootstrap}", web_enabled=False, datadir=tempfile.mkdtemp(),
                    broker_session_timeout=3.0, broker_heartbeat_interval=1.0, consumer_auto_offset_reset="latest",
                    topic_replication_factor=1, producer_linger=0.0)
    metrics = app.topic(metrics_name, key_serializer="raw", value_serializer="raw")
    alerts = app.topic(alerts_name, key_serializer="raw", value_serializer="raw")

    @app.agent(metrics)
    async def relay(stream):
        async for event in stream.events():
            alert = alert_for(event.value)
            if alert is not None:
                await alerts.send(key=event.key, value=alert)

    @app.task
    async def ready():
        print("relay ready", flush=True)

    sys.argv = [sys.argv[0], "worker", "-l", "warn"]
    app.main()


if __name__ == "__main__":
    if kind == "aiokafka":
        asyncio.run(aiokafka_relay())
    else:
        faust_relay()
