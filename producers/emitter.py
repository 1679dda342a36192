"""The one Kafka emitter every producer shares: a bounded queue drained by a background sender thread.

The training thread only appends to a ``deque`` (drop-oldest when full, counted) and sets an event;
everything that can block or fail — connecting, metadata, sending, reconnecting with backoff — happens
on the sender thread, and no exception from it ever reaches the caller. After ``fork`` (DataLoader
workers) the child's emitter is inert: only the process that created it sends.

Values are encoded on the sender thread (or, with ``pack_batch``, packed there and encoded in the sender
subprocess), which is how the torch reporter defers ``tensor.item()`` (a host sync on CUDA) off the
training thread.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from .kafka_security import KafkaSecurityError, client_config
from .sender_child import PERMANENT, partition_for_key, passing

__all__ = ["Emitter", "EmitterStats", "default_bootstrap", "partition_for_key", "topic_name"]

log = logging.getLogger("lossguard.producer")

_LIVE: weakref.WeakSet[Emitter] = weakref.WeakSet()


def default_bootstrap() -> str:
    return os.environ.get("LOSSGUARD_BOOTSTRAP", "127.0.0.1:9092")


def topic_name(kind: str, prefix: str | None = None) -> str:
    """``lossguard.metrics`` etc.; the prefix comes from ``LOSSGUARD_TOPIC_PREFIX``."""
    return f"{prefix or os.environ.get('LOSSGUARD_TOPIC_PREFIX', 'lossguard')}.{kind}"


class _OncePerMinute(logging.Filter):
    """Lets each kafka-python connection message through once a minute: a job whose broker is gone must
    not have its log buried under reconnect errors (our own warning already said what happened)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        if now - self._seen.get(key, -1e9) < 60.0:
            return False
        self._seen[key] = now
        return True


_NOISY_KAFKA_LOGGERS = ("kafka.net.connection", "kafka.net.manager", "kafka.net.transport", "kafka.cluster",
                        "kafka.conn", "kafka.client_async", "kafka.consumer.fetcher", "kafka.producer.sender",
                        "kafka.producer.kafka", "kafka.coordinator")
_quiet_installed = False


def quiet_kafka_logs() -> None:
    """Rate-limit kafka-python's per-retry connection logs (installed once, by the first emitter)."""
    global _quiet_installed
    if not _quiet_installed:
        _quiet_installed = True
        flt = _OncePerMinute()
        for name in _NOISY_KAFKA_LOGGERS:
            logging.getLogger(name).addFilter(flt)


class EmitterStats:
    #: requeued: events whose send failed for a passing reason (broker down, timeout) and that went back to
    #: the front of the queue for the next round (counted each time)
    __slots__ = ("queued", "sent", "dropped", "errors", "requeued")

    def __init__(self) -> None:
        self.queued = self.sent = self.dropped = self.errors = self.requeued = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


class Emitter:
    """Non-blocking keyed sender to one topic.

    Args:
        topic: Kafka topic to write to.
        bootstrap: ``host:port[,host:port]``; default ``LOSSGUARD_BOOTSTRAP`` or 127.0.0.1:9092.
        max_queue: events held while the broker is slow or away; beyond it the oldest are dropped.
        encode: turns a queued value into bytes on the sender thread.
        encode_batch: optional; turns the values queued under one key since the last round into ONE
            record (e.g. several steps of a run). A record per run per round instead of one per step is
            what keeps kafka-python's pure-Python ``send()`` from taking GIL time away from training.
        pack_batch: optional, with ``encode_batch``; turns a key's values into the compact form of
            ``sender_child.pack_steps``, which the sender subprocess (transport ``"process"``) encodes: this
            process then spends no GIL time on JSON. ``encode_batch`` is still used in-process.
        max_batch: most values packed into one record by ``encode_batch`` (500).
        transport: ``"thread"`` runs kafka-python in this process; ``"process"`` runs it in a sender
            subprocess (:mod:`producers.sender`), so its pure-Python network layer never holds this
            process's GIL — what a training loop wants.
        producer_config: extra kafka-python ``KafkaProducer`` settings.
        flush_timeout: longest wait in ``flush()``/``close()`` and at interpreter exit (5 s).
        linger: seconds the sender waits after a batch before it drains again (50 ms): fewer, bigger
            batches mean fewer thread switches and less GIL time taken from the training thread.
    """

    def __init__(self, topic: str, *, bootstrap: str | None = None, max_queue: int = 10_000,
                 encode: Callable[[Any], bytes] | None = None, producer_config: dict[str, Any] | None = None,
                 flush_timeout: float = 5.0, linger: float = 0.05,
                 encode_batch: Callable[[list[Any]], bytes] | None = None, max_batch: int = 500,
                 transport: str = "thread", pack_batch: Callable[[list[Any]], bytes] | None = None):
        if transport not in ("thread", "process"):
            raise ValueError(f"transport must be 'thread' or 'process', got {transport!r}")
        self.transport = transport
        self.topic = topic
        self.bootstrap = bootstrap or default_bootstrap()
        self.stats = EmitterStats()
        self.flush_timeout = flush_timeout
        self._encode = encode or (lambda v: v)
        self._encode_batch = encode_batch
        self._pack_batch = pack_batch if transport == "process" and encode_batch is not None else None
        self._follow: dict[str, Any] | None = None
        self._on_control: Callable[[bytes], None] | None = None
        self._on_warning: Callable[[str], None] | None = None
        self.max_batch = max(1, int(max_batch))
        self._queue: deque[tuple[bytes | None, Any]] = deque(maxlen=max_queue)
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._hurry = threading.Event()  # set while flush() or close() waits, or for an urgent event: no lingering
        self._flushing = 0  # flush() calls waiting
        self._urgent = False  # an urgent event set _hurry: the sender clears it once it has woken for it
        self._closed = False
        self._forked = False
        self._pid = os.getpid()
        self.linger = linger
        self._producer_config = {"linger_ms": 5, "acks": 1, "enable_idempotence": False, "max_block_ms": 2000,
                                 "retries": 3, "request_timeout_ms": 5000, "reconnect_backoff_max_ms": 2000,
                                 **(producer_config or {})}
        self._warned = False
        self._settling = threading.Lock()
        self._partitions: dict[bytes, int] = {}
        self._producer: Any = None  # the sender thread's current producer (close() may need to end it)
        quiet_kafka_logs()
        self._thread = threading.Thread(target=self._run, name=f"lossguard-emitter[{topic}]", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    # -- caller side: must stay cheap and never raise ------------------------------------------------
    def emit(self, key: str | bytes | None, value: Any, urgent: bool = False) -> None:
        """Queue one event; O(1), never blocks, never raises. Dropped in a forked child. An ``urgent``
        event (a NaN loss) ends the sender's linger: it goes out now with whatever else is queued."""
        if self._closed or self._forked:
            return
        queue = self._queue
        if len(queue) == queue.maxlen:
            self.stats.dropped += 1  # deque(maxlen) drops the oldest on append
        queue.append((key.encode() if isinstance(key, str) else key, value))
        self.stats.queued += 1
        # Event.set/clear take a lock: only the first event after a round touches them (the sender lingers
        # and then drains everything)
        if self._idle.is_set():
            self._idle.clear()
        if urgent and not self._hurry.is_set():
            self._urgent = True
            self._hurry.set()
        if not self._wake.is_set():
            self._wake.set()

    def follow(self, topic: str, key: str, since_ms: int, on_record: Callable[[bytes], None],
               on_warning: Callable[[str], None] | None = None) -> None:
        """(transport ``"process"``) Have the sender subprocess tail ``topic`` for records keyed ``key``
        written at or after ``since_ms``; ``on_record(value)`` runs on a reader thread. The subprocess
        starts now, not at the first event, and a replacement follows too."""
        if self.transport != "process":
            raise ValueError("only the process transport can follow a topic")
        self._on_control, self._on_warning = on_record, on_warning
        self._follow = {"topic": topic, "key": key, "since_ms": int(since_ms)}
        self._wake.set()

    def unfollow(self) -> None:
        self._follow = None

    def _control_record(self, value: bytes) -> None:
        if self._follow is not None and self._on_control is not None:
            self._on_control(value)

    def _control_warning(self, reason: str) -> None:
        if self._follow is not None and self._on_warning is not None:
            self._on_warning(reason)

    @property
    def inert(self) -> bool:
        """True in a process forked from the one that created this emitter (it never sends there)."""
        return self._forked or os.getpid() != self._pid

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued events are handed to Kafka; ``False`` if that did not happen in time."""
        if self.inert or not self._thread.is_alive():
            return not self._queue
        deadline = time.monotonic() + (self.flush_timeout if timeout is None else timeout)
        self._flushing += 1
        self._hurry.set()
        try:
            while True:
                self._wake.set()
                if not self._idle.wait(max(0.0, deadline - time.monotonic())):
                    return False
                if not self._queue:  # idle can be set just as a new event lands: look again
                    return True
                time.sleep(0.001)
        finally:
            self._flushing -= 1
            if not self._closed and not self._flushing:
                self._hurry.clear()

    def close(self, timeout: float | None = None) -> None:
        if self._closed or self.inert:
            return
        self.flush(timeout)
        self._closed = True
        self._hurry.set()
        self._wake.set()
        self._thread.join(timeout=self.flush_timeout if timeout is None else timeout)
        producer = self._producer
        if self._thread.is_alive() and self.transport == "process" and producer is not None:
            # still waiting on the sender process: end it, which fails (and so counts) what it held
            _close_producer(producer, 0)
            self._thread.join(timeout=1.0)
        if self._queue:  # the broker did not take them in time: they are lost, and counted as such
            self._drop_all()

    # -- sender thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        producer = None
        backoff = 0.2
        while True:
            self._wake.wait(0.5)
            self._wake.clear()
            if not self._queue:
                self._idle.set()
                if self._closed:
                    break
                if producer is not None and getattr(producer, "gone", False):
                    # a sender process that died while idle: with nothing to send nobody else would notice,
                    # and stop requests would go unheard until the next step
                    self._warn("lossguard: the sender process exited; starting a new one")
                    _close_producer(producer, 0)
                    producer = self._producer = None
                if producer is None and self._follow is not None:  # listening starts before the first event
                    producer = self._producer = self._connect()
                continue
            if producer is None:
                if self._closed:
                    self._drop_all()
                    break
                producer = self._producer = self._connect()
                if producer is None:
                    self._wake.wait(backoff)  # stay responsive to close() while backing off
                    backoff = min(backoff * 2, 5.0)
                    if self._closed:
                        self._drop_all()
                        break
                    self._wake.set()
                    continue
                backoff = 0.2
            # this round's [future, n, key, values]: those still open when the producer dies go back to the queue
            batch: list[Any] = []
            groups = self._drain()
            handed = 0  # groups handed to kafka-python; the rest go back to the queue if the round fails
            try:
                for key, values in groups:
                    try:
                        future = self._send(producer, key, values)
                    except _Unencodable:
                        handed += 1
                        continue
                    except Exception as exc:
                        if _passing(exc):
                            raise  # broker trouble: this group and the rest go back to the queue
                        handed += 1  # e.g. a record over the broker's size limit: no retry sends it
                        self.stats.dropped += len(values)
                        self._warn(f"lossguard: an event could not be sent ({exc}); dropped")
                        continue
                    handed += 1
                    entry = [future, len(values), key, values, True]  # [4]: not yet settled
                    batch.append(entry)
                    future.add_callback(self._sent, batch, entry).add_errback(self._failed, batch, entry)
                producer.flush(timeout=self.flush_timeout)
                if not self._queue:
                    self._idle.set()
                # linger even while events keep coming: fewer, bigger rounds take less GIL time from training
                self._hurry.wait(self.linger)
                if self._urgent:  # woken for an urgent event, which the next round sends: linger again after
                    self._urgent = False
                    if not self._closed and not self._flushing:
                        self._hurry.clear()
            except Exception as exc:  # noqa: BLE001 — broker trouble: reconnect later
                self._warn(f"lossguard: sending to {self.bootstrap} failed ({exc}); events are kept (up to "
                           "max_queue) and sent when it is back")
                # callbacks that still fire now count nothing: what is open is requeued here, with the groups
                # never handed over (the one whose send() raised included)
                open_entries = [(entry[2], entry[3]) for entry in batch if self._settle(entry)]
                self._requeue(open_entries + groups[handed:])
                _close_producer(producer, 0)
                producer = self._producer = None
                self._wake.set()
        if producer is not None:
            _close_producer(producer, 1)

    def _send(self, producer: Any, key: bytes | None, values: list[Any]) -> Any:
        packed = None
        if self._pack_batch is not None and hasattr(producer, "send_packed"):
            try:
                packed = self._pack_batch(values)
            except Exception:  # noqa: BLE001 — a value marshal cannot take: encode it here instead
                log.debug("lossguard: could not pack a batch; encoding it in-process", exc_info=True)
        if packed is None:
            try:
                payload = self._encode_batch(values) if self._encode_batch else self._encode(values[0])
            except Exception:  # noqa: BLE001 — a bad value is dropped, never raised
                self.stats.errors += len(values)
                log.exception("lossguard: could not encode an event; dropped")
                raise _Unencodable from None
        if packed is not None:
            return producer.send_packed(key, packed)
        return producer.send(self.topic, key=key, value=payload, partition=self._partition(producer, key))

    def _partition(self, producer: Any, key: bytes | None) -> int | None:
        """The default partitioner's choice for ``key``, hashed once per key: murmur2 in pure Python
        costs more than the rest of ``send()``, and every event of a run has the same key."""
        if key is None:
            return None
        partition = self._partitions.get(key)
        if partition is None:
            partitions = producer.partitions_for(self.topic)  # blocks ≤ max_block_ms on first use
            if not partitions:
                return None  # unknown yet: let kafka-python pick (it uses the same hash)
            partition = self._partitions[key] = partition_for_key(key, partitions)
        return partition

    def _connect(self):
        try:
            # the [kafka] security settings (SASL/TLS) first; an explicit producer_config wins
            config = {**client_config(), **self._producer_config}
        except KafkaSecurityError as exc:
            self._warn(f"lossguard: Kafka security settings unusable ({exc}); training continues, events are "
                       "queued and the oldest dropped when full")
            return None
        try:
            if self.transport == "process":
                from .sender import SenderProcess

                # the child reads the security settings from the environment it inherits (not argv)
                return SenderProcess(self.topic, self.bootstrap, self._producer_config, self.flush_timeout,
                                     follow=self._follow, on_control=self._control_record,
                                     on_warning=self._control_warning)
            from kafka import KafkaProducer

            return KafkaProducer(bootstrap_servers=self.bootstrap.split(","), **config)
        except Exception as exc:  # noqa: BLE001 — NoBrokersAvailable and friends
            self._warn(f"lossguard: no Kafka broker at {self.bootstrap} ({exc.__class__.__name__}); "
                       "training continues, events are queued and the oldest dropped when full")
            return None

    def _drop_all(self) -> None:
        self.stats.dropped += len(self._queue)
        self._queue.clear()
        self._idle.set()

    def _drain(self) -> list[tuple[bytes | None, list[Any]]]:
        """Take everything queued; with ``encode_batch``, group it by key (order kept within a key)."""
        items = []
        while self._queue:
            items.append(self._queue.popleft())
        if self._encode_batch is None:
            return [(key, [value]) for key, value in items]
        groups: dict[bytes | None, list[Any]] = {}
        for key, value in items:
            groups.setdefault(key, []).append(value)
        return [(key, values[i:i + self.max_batch]) for key, values in groups.items()
                for i in range(0, len(values), self.max_batch)]

    def _settle(self, entry: list[Any]) -> bool:
        """Mark a sent batch's outcome as taken into account; False if it already was (by the sender thread
        giving up on the round or by a callback on kafka-python's thread)."""
        with self._settling:
            open_, entry[4] = entry[4], False
            return open_

    def _sent(self, batch: list[Any], entry: list[Any], _metadata: Any) -> None:
        if self._settle(entry):
            self.stats.sent += entry[1]

    def _failed(self, batch: list[Any], entry: list[Any], exc: BaseException) -> None:
        if not self._settle(entry):
            return
        if _passing(exc):
            self._warn(f"lossguard: events could not be delivered yet ({exc}); kept for the next round")
            self._requeue([(entry[2], entry[3])])
            return
        self.stats.dropped += entry[1]
        self._warn(f"lossguard: an event could not be delivered ({exc}); dropped")

    def _requeue(self, groups: list[tuple[bytes | None, list[Any]]]) -> None:
        """Put events whose send failed back at the front of the queue, oldest first; beyond ``max_queue``
        the oldest are dropped (and counted), as for new events."""
        items = [(key, value) for key, values in groups for value in values]
        if not items:
            return
        room = max(0, self._queue.maxlen - len(self._queue))
        if len(items) > room:
            self.stats.dropped += len(items) - room
            items = items[len(items) - room:]
        self._queue.extendleft(reversed(items))
        self.stats.requeued += len(items)
        self._idle.clear()
        self._wake.set()

    def _warn(self, message: str) -> None:
        if not self._warned:  # log once; stats keep counting
            self._warned = True
            log.warning(message)


def _passing(exc: BaseException) -> bool:
    """Whether a failed send may succeed later: the sender process said so (its reasons are marked
    permanent otherwise), or, in this process, :func:`sender_child.passing`."""
    if isinstance(exc, ConnectionError) and str(exc).startswith(PERMANENT):  # the sender process said so
        return False
    return passing(exc)


class _Unencodable(Exception):
    """A batch that could not be encoded (already counted in ``stats.errors``)."""


def _close_producer(producer: Any, timeout: float) -> None:
    try:
        producer.close(timeout=timeout)
    except Exception:  # noqa: BLE001
        # kafka-python 3.0's close() flushes first and raises on timeout before it force-closes, which
        # leaves its sender thread running and makes __del__ raise later: finish the close by hand.
        try:
            producer._sender.force_close()
            producer._closed = True
        except Exception:  # noqa: BLE001
            pass


def _mark_forked() -> None:
    # A DataLoader worker (or any fork) inherits the queue but not the sender thread: it must not send.
    for emitter in list(_LIVE):
        emitter._forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_mark_forked)


@atexit.register
def _flush_all_at_exit() -> None:
    for emitter in list(_LIVE):
        try:
            emitter.close(timeout=emitter.flush_timeout)
        except Exception:  # noqa: BLE001
            pass
