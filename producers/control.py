"""The job's ear on the control topic: stop requests for one run reach its reporter.

A :class:`ControlListener` tails the control topic with a kafka-python consumer — in the sender subprocess
when it is given the run's process-transport :class:`~producers.emitter.Emitter` (the training process
then runs no consumer), else on a daemon thread. It joins no consumer group (so a restart waits for no
rebalance, and every rank of a job hears every request) and reads only the one partition its run's key
hashes to, with kafka-python's default partitioner (murmur2, the Java client's): the same partition the
stream app's auto-stop sink and ``lossguard stop`` write to. Requests older than the listener are
ignored, so a resumed attempt is not stopped by the request that ended the previous one. Nothing here
blocks or raises into the training loop: a missing broker or topic is retried with backoff, a malformed
message is skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from detectors.events import ControlEvent, SchemaError, decode_control_event

from .emitter import Emitter, default_bootstrap, quiet_kafka_logs, topic_name
from .sender_child import follow_control

__all__ = ["ControlListener"]

log = logging.getLogger("lossguard.producer")


class ControlListener:
    """Calls ``on_event`` with each control event for ``run_id`` written after the listener started.

    Args:
        run_id: the run whose requests to hear (the Kafka key on the control topic).
        on_event: called on a background thread; must be quick (the reporter only sets a flag).
        bootstrap: Kafka address; default ``LOSSGUARD_BOOTSTRAP`` or 127.0.0.1:9092.
        topic: control topic; default ``<LOSSGUARD_TOPIC_PREFIX>.control``.
        since: unix time (s) before which requests are ignored; default now.
        poll_interval: seconds per poll; bounds how long a stop request waits and how long close() takes.
        emitter: an emitter with transport ``"process"`` whose sender subprocess should do the listening
            (default ``None``: a thread of this process listens).
    """

    def __init__(self, run_id: str, on_event: Callable[[ControlEvent], None], *, bootstrap: str | None = None,
                 topic: str | None = None, since: float | None = None, poll_interval: float = 0.5,
                 emitter: Emitter | None = None):
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
        self._emitter = emitter if emitter is not None and emitter.transport == "process" else None
        self._thread: threading.Thread | None = None
        if self._emitter is not None:
            self._emitter.follow(self.topic, run_id, self.since_ms, self._handle, self._warn)
            return
        quiet_kafka_logs()
        self._thread = threading.Thread(
            target=follow_control, name=f"lossguard-control[{run_id}]", daemon=True,
            args=(self.bootstrap, self.topic, self._key, self.since_ms, self._handle, self._closed),
            kwargs={"poll_interval": poll_interval, "on_problem": self._warn})
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        self._closed.set()
        if self._emitter is not None:
            self._emitter.unfollow()
        elif self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _handle(self, value: bytes) -> None:
        if self._closed.is_set():
            return
        try:
            event = decode_control_event(value)
        except (SchemaError, TypeError, ValueError) as exc:
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
            log.warning("lossguard: %s", message)
