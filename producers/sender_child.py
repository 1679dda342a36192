"""The sender subprocess: the only place the training job's events meet kafka-python.

Run as a script (not ``-m``), so it imports kafka-python, orjson and the standard library only — never
torch, numpy or the rest of ``producers`` and ``detectors``: the record format comes from
``detectors/events.py``, loaded by its path (that module imports nothing of lossguard). It reads frames from stdin and answers on stdout, one line per frame:

    frame  = header (">cIii": kind, id, key length or -1, value length) + key + value
    kind S = send the record; answer ``A <id>`` once Kafka acked it, ``E <id> <reason>`` if it failed
    kind M = the same for a run's steps packed by the parent (:func:`pack_steps`; :func:`encode_steps`
             reads them): float conversion and JSON encoding happen here, not on the training process's GIL
    kind F = flush the producer; answer ``F <id>`` when done

With a control topic to follow (the fifth argument), a consumer thread tails the run's partition and
writes ``C <base64 record value>`` for each request keyed by the run, and ``W <reason>`` when it cannot
read the topic: the training process then runs no Kafka consumer of its own.

No broker: frames are answered ``E`` at once and the connection is retried with backoff. EOF on stdin (the
training process ended or died) flushes what is in flight for at most ``flush_timeout`` and exits.
"""

from __future__ import annotations

import base64
import json
import logging
import marshal
import os
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

HEADER = struct.Struct(">cIii")


def _wire_format():
    """``detectors/events.py``, the one module that owns the record format, loaded by its path: importing
    the ``detectors`` package would load every detector (numpy); the module itself imports the standard
    library and orjson only."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "detectors" / "events.py"
    spec = importlib.util.spec_from_file_location("lossguard_wire_format", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the event types
    spec.loader.exec_module(module)
    return module


try:  # imported as producers.sender_child (the control listener's thread, the thread transport)
    from .kafka_security import client_config  # first: as a script, this is what fails
except ImportError:  # run as a script: its folder is on sys.path; the module imports the stdlib only
    from kafka_security import client_config

    _wire = _wire_format()
    encode_batch, encode_event = _wire.encode_batch, _wire.encode_event
else:
    from detectors.events import encode_batch, encode_event


def pack_steps(items: list[tuple], rss: float | None = None) -> bytes:
    """A run's queued steps, as the training process hands them over: ``(run_id, step, ts, source,
    {metric: number}, tags)`` each, with the process's RSS (added to every step that has none). marshal
    packs them at C speed (parent and child are the same interpreter) and takes the tuples as they are:
    turning numbers into floats, comparing tags and encoding JSON all happen on this side."""
    return marshal.dumps((rss, items))


def encode_steps(packed: bytes) -> bytes:
    """The metric record for packed steps, written by ``detectors.events``: one event for one step, else a
    batched record (the forms ``detectors.events.decode_metric_record`` reads). A value that is not a
    number is left out.

    >>> encode_steps(pack_steps([("r", 3, 1.5, "torch", {"loss": float("nan"), "note": "x"}, {})]))
    b'{"v":1,"run_id":"r","step":3,"ts":1.5,"source":"torch","metrics":{"loss":"NaN"},"tags":{}}'
    """
    rss, items = marshal.loads(packed)
    run_id, _, _, source, _, tags = items[0]
    if len(items) == 1:
        _, step, ts, _, metrics, _ = items[0]
        return encode_event(run_id, int(step), ts, source, _numbers(metrics, rss), tags)
    return encode_batch(run_id, source, tags, [(int(step), ts, _numbers(metrics, rss), step_tags)
                                               for _, step, ts, _, metrics, step_tags in items])


def _numbers(metrics: dict, rss: float | None) -> dict[str, float]:
    values = {}
    for name, value in metrics.items():
        if type(value) is not float:
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
        values[name] = value
    if rss is not None and "rss" not in values:
        values["rss"] = rss
    return values


#: starts the reason of a failure that no retry mends (the parent drops that record instead of requeueing it)
PERMANENT = "permanent: "


#: kafka-python errors a later round may get past although they are not marked retriable — the broker's
#: "unknown server error" (-1) among them: a broker that has just restarted answers it for a topic it has
#: not loaded yet (seen dropping 500 steps after an outage)
PASSING_ERRORS = ("KafkaTimeoutError", "NoBrokersAvailable", "KafkaConnectionError", "UnknownError")


def passing(exc: BaseException) -> bool:
    """Whether a send that failed with ``exc`` may succeed later (the broker down, slow or restarting)."""
    return (bool(getattr(exc, "retriable", False)) or isinstance(exc, (ConnectionError, TimeoutError))
            or type(exc).__name__ in PASSING_ERRORS)


def _failure(exc: BaseException) -> str:
    """The reason a send failed, marked permanent unless a retry may succeed (:func:`passing`)."""
    return f"{'' if passing(exc) else PERMANENT}{type(exc).__name__}: {exc}".replace("\n", " ")


def partition_for_key(key: bytes, partitions: list[int] | set[int]) -> int:
    """The partition kafka-python's default partitioner (and the Java client's) picks for ``key``.

    >>> partition_for_key(b"run-1", [0, 1, 2]) in (0, 1, 2)
    True
    """
    from kafka.partitioner.default import murmur2

    ordered = sorted(partitions)
    return ordered[(murmur2(key) & 0x7FFFFFFF) % len(ordered)]


def follow_control(bootstrap: str, topic: str, key: bytes, since_ms: int, on_record: Callable[[bytes], None],
                   closed: threading.Event, *, poll_interval: float = 0.5,
                   on_problem: Callable[[str], None] = lambda _reason: None) -> None:
    """Call ``on_record(value)`` for each record keyed ``key`` on ``topic`` written at or after
    ``since_ms``, until ``closed`` is set; a missing broker or topic is retried with backoff.

    No consumer group (a restart waits for no rebalance, every rank hears every request); only the one
    partition the key hashes to — where the auto-stop sink and ``lossguard stop`` write.
    """
    backoff = 0.2
    while not closed.is_set():
        try:
            consumer = _assign(bootstrap, topic, key, since_ms, poll_interval)
        except Exception as exc:  # noqa: BLE001 — NoBrokersAvailable, missing topic ...
            on_problem(f"cannot listen for stop requests on {topic} at {bootstrap} ({exc}); "
                       "training continues, retrying in the background")
            closed.wait(backoff)
            backoff = min(backoff * 2, 5.0)
            continue
        backoff = 0.2
        try:
            while not closed.is_set():
                for records in consumer.poll(timeout_ms=int(poll_interval * 1000)).values():
                    for record in records:
                        if record.key == key and record.timestamp >= since_ms:
                            on_record(record.value)
        except Exception as exc:  # noqa: BLE001 — broker trouble: reconnect later
            on_problem(f"control topic {topic} unreadable ({exc}); retrying")
        finally:
            _close_consumer(consumer)


def _assign(bootstrap: str, topic: str, key: bytes, since_ms: int, poll_interval: float):
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), group_id=None, enable_auto_commit=False,
                             **client_config(),  # SASL/TLS from the [kafka] settings (inherited environment)
                             fetch_max_wait_ms=int(poll_interval * 1000),  # an idle topic: 2 fetches/s
                             allow_auto_create_topics=False,  # Tansu would create it with 4 partitions
                             request_timeout_ms=5000, bootstrap_timeout_ms=2000, reconnect_backoff_max_ms=2000)
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise LookupError(f"topic {topic} does not exist (yet)")
        tp = TopicPartition(topic, partition_for_key(key, partitions))
        consumer.assign([tp])
        # Start at the first request not older than since_ms; fall back to the beginning of the partition
        # (records are filtered by timestamp anyway) where the broker cannot look it up.
        try:
            found = consumer.offsets_for_times({tp: since_ms}).get(tp)
        except Exception:  # noqa: BLE001
            found = None
        if found is not None:
            consumer.seek(tp, found.offset)
        else:
            consumer.seek_to_beginning(tp)
        return consumer
    except BaseException:
        _close_consumer(consumer)
        raise


def _close_consumer(consumer) -> None:
    try:
        consumer.close(autocommit=False)
    except Exception:  # noqa: BLE001
        pass


def _read_exact(stream, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def main(argv: list[str]) -> int:
    topic, bootstrap, config_json, flush_timeout = argv[0], argv[1], argv[2], float(argv[3])
    follow = json.loads(argv[4]) if len(argv) > 4 and argv[4] else None
    config = json.loads(config_json)
    try:  # a sender must never take a core from the training job it serves
        os.nice(10)
    except (AttributeError, OSError):
        pass
    logging.basicConfig(level=logging.CRITICAL)  # the parent reports; kafka-python's logs are noise here
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    lock = threading.Lock()

    def answer(line: str) -> None:
        with lock:
            stdout.write(line.encode() + b"\n")
            stdout.flush()

    closed = threading.Event()
    if follow:
        threading.Thread(
            target=follow_control, daemon=True, name="lossguard-control",
            args=(bootstrap, follow["topic"], follow["key"].encode(), int(follow["since_ms"]),
                  lambda value: answer("C " + base64.b64encode(value or b"").decode()), closed),
            kwargs={"on_problem": lambda reason: answer("W " + reason.replace("\n", " "))}).start()

    producer = None
    next_try = 0.0
    backoff = 0.5

    def connect():
        nonlocal producer, next_try, backoff
        if producer is None and time.monotonic() >= next_try:
            try:
                from kafka import KafkaProducer

                # SASL/TLS from the inherited environment: a password must never ride on the command line
                producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), **{**client_config(), **config})
                backoff = 0.5
            except Exception as exc:  # noqa: BLE001 — NoBrokersAvailable and friends
                next_try = time.monotonic() + backoff
                backoff = min(backoff * 2, 5.0)
                return f"no broker at {bootstrap} ({exc.__class__.__name__})"
        return None if producer is not None else f"no broker at {bootstrap} (retrying)"

    while True:
        header = _read_exact(stdin, HEADER.size)
        if header is None:
            break
        kind, fid, key_len, value_len = HEADER.unpack(header)
        key = _read_exact(stdin, key_len) if key_len >= 0 else None
        value = _read_exact(stdin, value_len) or b""
        if kind == b"F":
            if producer is not None:
                try:
                    producer.flush(timeout=flush_timeout)
                except Exception:  # noqa: BLE001 — the parent times out and counts what was lost
                    pass
            answer(f"F {fid}")
            continue
        problem = connect()
        if problem:
            answer(f"E {fid} {problem}")
            continue
        try:
            value = encode_steps(value) if kind == b"M" else value
        except Exception as exc:  # noqa: BLE001 — a bad batch is lost (and counted), never fatal
            answer(f"E {fid} {PERMANENT}could not encode ({exc})".replace("\n", " "))
            continue
        try:
            future = producer.send(topic, key=key, value=value)
            future.add_callback(lambda _md, fid=fid: answer(f"A {fid}"))
            future.add_errback(lambda exc, fid=fid: answer(f"E {fid} {_failure(exc)}"))
        except Exception as exc:  # noqa: BLE001
            answer(f"E {fid} {_failure(exc)}")
            try:
                producer.close(timeout=0)
            except Exception:  # noqa: BLE001
                pass
            producer = None
    closed.set()
    if producer is not None:
        try:
            producer.close(timeout=flush_timeout)
        except Exception:  # noqa: BLE001
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
