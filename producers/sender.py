"""Kafka out of the training process: a proxy producer whose sends run in a sender subprocess.

kafka-python is pure Python: its network layer spends about a millisecond of CPU per produce request,
holding the GIL the training loop needs. :class:`SenderProcess` offers the small part of
``KafkaProducer`` the :class:`~producers.emitter.Emitter` uses (``send`` → future, ``flush``,
``partitions_for``, ``close``), writes each record as a frame to ``producers/sender_child.py`` and
resolves the futures from the child's answers on a reader thread that sleeps in ``readline``. The
emitter's accounting — sent, dropped, flush with a time limit — is unchanged; the training process
only packs values (:meth:`SenderProcess.send_packed`: the child encodes them) and writes to a pipe. The
child can also tail the control topic for the run (``follow``), handing each request to ``on_control``.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["SenderProcess", "SenderFuture"]

_CHILD = Path(__file__).with_name("sender_child.py")

log = logging.getLogger("lossguard.producer")


class SenderFuture:
    """The outcome of one send: callbacks run on the reader thread, like kafka-python's."""

    __slots__ = ("is_done", "_callbacks", "_errbacks")

    def __init__(self) -> None:
        self.is_done = False
        self._callbacks: list[Any] = []
        self._errbacks: list[Any] = []

    def add_callback(self, fn: Any, *args: Any) -> SenderFuture:
        self._callbacks.append((fn, args))
        return self

    def add_errback(self, fn: Any, *args: Any) -> SenderFuture:
        self._errbacks.append((fn, args))
        return self

    def _resolve(self, error: BaseException | None) -> None:
        if self.is_done:
            return
        self.is_done = True
        for fn, args in (self._errbacks if error else self._callbacks):
            fn(*args, error)


class SenderProcess:
    """A producer proxy backed by a sender subprocess (see the module docstring)."""

    def __init__(self, topic: str, bootstrap: str, producer_config: dict[str, Any], flush_timeout: float = 5.0,
                 follow: dict[str, Any] | None = None, on_control: Callable[[bytes], None] | None = None,
                 on_warning: Callable[[str], None] | None = None):
        """``follow``: ``{"topic", "key", "since_ms"}`` of a control topic the child tails for this run;
        ``on_control(value)`` and ``on_warning(reason)`` are then called on the reader thread."""
        from .sender_child import HEADER

        self._header = HEADER
        self.topic = topic
        self._pending: dict[int, SenderFuture] = {}
        self._flushed: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self._next_id = 0
        self._dead: str | None = None
        self._on_control = on_control
        self._on_warning = on_warning
        self.process = subprocess.Popen(
            [sys.executable, str(_CHILD), topic, bootstrap, json.dumps(producer_config), str(flush_timeout),
             json.dumps(follow) if follow else ""],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
        self._reader = threading.Thread(target=self._read_answers, name="lossguard-sender-answers", daemon=True)
        self._reader.start()

    @property
    def gone(self) -> bool:
        """Whether the sender process has exited (or its pipe broke)."""
        return self._dead is not None or self.process.poll() is not None

    def partitions_for(self, _topic: str) -> None:
        return None  # the child's producer hashes the key with the same default partitioner

    def send(self, topic: str, key: bytes | None = None, value: bytes = b"", partition: int | None = None
             ) -> SenderFuture:
        return self._submit(b"S", key, value)

    def send_packed(self, key: bytes | None, packed: bytes) -> SenderFuture:
        """Send steps packed by ``sender_child.pack_steps``; the child encodes them into the record."""
        return self._submit(b"M", key, packed)

    def _submit(self, kind: bytes, key: bytes | None, value: bytes) -> SenderFuture:
        future = SenderFuture()
        with self._lock:
            fid = self._next_id = self._next_id + 1
            self._pending[fid] = future
        self._write(kind, fid, key, value)
        return future

    def flush(self, timeout: float | None = None) -> None:
        """Return once every record sent so far is acked or failed; raise TimeoutError otherwise."""
        deadline = time.monotonic() + (5.0 if timeout is None else timeout)
        with self._lock:
            fid = self._next_id = self._next_id + 1
            done = self._flushed[fid] = threading.Event()
        self._write(b"F", fid, None, b"")
        if not done.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError("the sender process did not flush in time")
        while self._pending:  # answers for the last records can trail the flush answer by a moment
            if time.monotonic() > deadline:
                raise TimeoutError("the sender process did not confirm every record in time")
            time.sleep(0.001)

    def close(self, timeout: float | None = None) -> None:
        try:
            self.process.stdin.close()  # EOF: the child flushes what is in flight and exits
        except OSError:
            pass
        try:
            self.process.wait(timeout=5.0 if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self._reader.join(timeout=1.0)
        self._fail_all("the sender process was closed")

    def _write(self, kind: bytes, fid: int, key: bytes | None, value: bytes) -> None:
        if self._dead:
            raise ConnectionError(self._dead)
        frame = self._header.pack(kind, fid, -1 if key is None else len(key), len(value)) + (key or b"") + value
        try:
            self.process.stdin.write(frame)
        except (OSError, ValueError) as exc:
            self._dead = f"the sender process is gone ({exc})"
            raise ConnectionError(self._dead) from None

    def _read_answers(self) -> None:
        # buffered: the raw pipe would read a line a byte at a time, a GIL round trip per byte
        for line in io.BufferedReader(self.process.stdout):
            kind, _, rest = line.decode(errors="replace").rstrip("\n").partition(" ")
            if kind in ("C", "W"):
                self._control_line(kind, rest)
                continue
            fid_text, _, reason = rest.partition(" ")
            try:
                fid = int(fid_text)
            except ValueError:
                continue
            if kind == "F":
                with self._lock:
                    done = self._flushed.pop(fid, None)
                if done is not None:
                    done.set()
                continue
            with self._lock:
                future = self._pending.pop(fid, None)
            if future is not None:
                future._resolve(None if kind == "A" else ConnectionError(reason or "send failed"))
        self._dead = self._dead or "the sender process exited"
        self._fail_all(self._dead)

    def _control_line(self, kind: str, rest: str) -> None:
        handler = self._on_control if kind == "C" else self._on_warning
        if handler is None:
            return
        try:
            handler(base64.b64decode(rest) if kind == "C" else rest)
        except Exception:  # noqa: BLE001 — a handler's bug must not stop the answers
            log.exception("lossguard: control handler failed")

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            flushes, self._flushed = self._flushed, {}
        for future in pending.values():
            future._resolve(ConnectionError(reason))
        for done in flushes.values():
            done.set()
