"""The job's ear on the control topic: stop requests for one run reach its reporter.

A :class:`ControlListener` runs a kafka-python consumer on a daemon thread. It joins no consumer group
(so a restart waits for no rebalance, and every rank of a job hears every request) and reads only the
one partition its run's key hashes to, with kafka-python's default partitioner (murmur2, the Java
client's): the same partition the stream app's auto-stop sink and ``lossguard stop`` write to.
Requests older than the listener are ignored, so a resumed attempt is not stopped by the request that
ended the previous one. Nothing here blocks or raises into the training loop: a missing broker or
topic is retried with backoff, a malformed message is skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from detectors.events import ControlEvent, SchemaError, decode_control_event

from .emitter import default_bootstrap, partition_for_key, quiet_kafka_logs, topic_name

__all__ = ["ControlListener"]

log = logging.getLogger("lossguard.producer")


class ControlListener:
    """Calls ``on_event`` with each control event for ``run_id`` written after the listener started.

    Args:
        run_id: the run whose requests to hear (the Kafka key on the control topic).
        on_event: called on the listener thread; must be quick (the reporter only sets a flag).
        bootstrap: Kafka address; default ``LOSSGUARD_BOOTSTRAP`` or 127.0.0.1:9092.
        topic: control topic; default ``<LOSSGUARD_TOPIC_PREFIX>.control``.
        since: unix time (s) before which requests are ignored; default now.
        poll_interval: seconds per poll; bounds how long a stop request waits and how long close() takes.
    """

    def __init__(self, run_id: str, on_event: Callable[[ControlEvent], None], *, bootstrap: str | None = None,
                 topic: str | None = None, since: float | None = None, poll_interval: float = 0.25):
        self.run_id = run_id
        self.topic = topic or topic_name("control")
        self.bootstrap = bootstrap or default_bootstrap()
        self.since_ms = int((time.time() if since is None else since) * 1000)
        self.poll_interval = poll_interval
        self.received = 0
        self._key = run_id.encode()
        self._on_event = on_event
        self._closed = threading.Event()
        self._warned = False
        quiet_kafka_logs()
        self._thread = threading.Thread(target=self._run, name=f"lossguard-control[{run_id}]", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        self._closed.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- listener thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.2
        while not self._closed.is_set():
            consumer = self._assign()
            if consumer is None:
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.2
            try:
                while not self._closed.is_set():
                    for records in consumer.poll(timeout_ms=int(self.poll_interval * 1000)).values():
                        for record in records:
                            self._handle(record)
            except Exception as exc:  # noqa: BLE001 — broker trouble: reconnect later
                self._warn(f"lossguard: control topic {self.topic} unreadable ({exc}); retrying")
            finally:
                try:
                    consumer.close(autocommit=False)
                except Exception:  # noqa: BLE001
                    pass

    def _assign(self):
        consumer = None
        try:
            from kafka import KafkaConsumer, TopicPartition

            consumer = KafkaConsumer(bootstrap_servers=self.bootstrap.split(","), group_id=None,
                                     enable_auto_commit=False, fetch_max_wait_ms=100,
                                     allow_auto_create_topics=False,  # Tansu would create it with 4 partitions
                                     request_timeout_ms=5000, bootstrap_timeout_ms=2000,
                                     reconnect_backoff_max_ms=2000)
            partitions = consumer.partitions_for_topic(self.topic)
            if not partitions:
                raise LookupError(f"topic {self.topic} does not exist (yet)")
            tp = TopicPartition(self.topic, partition_for_key(self._key, partitions))
            consumer.assign([tp])
            # Start at the first request not older than this listener; fall back to the beginning of the
            # partition (records are filtered by timestamp anyway) where the broker cannot look it up.
            try:
                found = consumer.offsets_for_times({tp: self.since_ms}).get(tp)
            except Exception:  # noqa: BLE001
                found = None
            if found is not None:
                consumer.seek(tp, found.offset)
            else:
                consumer.seek_to_beginning(tp)
            return consumer
        except Exception as exc:  # noqa: BLE001 — NoBrokersAvailable, missing topic ...
            self._warn(f"lossguard: cannot listen for stop requests on {self.topic} at {self.bootstrap} "
                       f"({exc}); training continues, retrying in the background")
            if consumer is not None:
                try:
                    consumer.close(autocommit=False)
                except Exception:  # noqa: BLE001
                    pass
            return None

    def _handle(self, record) -> None:
        if record.key != self._key or record.timestamp < self.since_ms:
            return
        try:
            event = decode_control_event(record.value)
        except SchemaError as exc:
            log.warning("lossguard: ignoring a malformed control event for %s: %s", self.run_id, exc)
            return
        if event.run_id != self.run_id:
            return
        self.received += 1
        try:
            self._on_event(event)
        except Exception:  # noqa: BLE001
            log.exception("lossguard: control event handler failed")

    def _warn(self, message: str) -> None:
        if not self._warned:  # once: a job without a broker should not fill its log with retries
            self._warned = True
            log.warning(message)
