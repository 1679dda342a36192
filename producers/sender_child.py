"""The sender subprocess: the only place the training job's events meet kafka-python.

Run as a script (not ``-m``), so it imports kafka-python and the standard library only — never torch
or the rest of ``producers``. It reads frames from stdin and answers on stdout, one line per frame:

    frame  = header (">cIii": kind, id, key length or -1, value length) + key + value
    kind S = send the record; answer ``A <id>`` once Kafka acked it, ``E <id> <reason>`` if it failed
    kind F = flush the producer; answer ``F <id>`` when done

No broker: frames are answered ``E`` at once and the connection is retried with backoff. EOF on stdin (the
training process ended or died) flushes what is in flight for at most ``flush_timeout`` and exits.
"""

from __future__ import annotations

import json
import logging
import struct
import sys
import threading
import time

HEADER = struct.Struct(">cIii")


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
    config = json.loads(config_json)
    logging.basicConfig(level=logging.CRITICAL)  # the parent reports; kafka-python's logs are noise here
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    lock = threading.Lock()

    def answer(line: str) -> None:
        with lock:
            stdout.write(line.encode() + b"\n")
            stdout.flush()

    producer = None
    next_try = 0.0
    backoff = 0.5

    def connect():
        nonlocal producer, next_try, backoff
        if producer is None and time.monotonic() >= next_try:
            try:
                from kafka import KafkaProducer

                producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), **config)
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
            future = producer.send(topic, key=key, value=value)
            future.add_callback(lambda _md, fid=fid: answer(f"A {fid}"))
            future.add_errback(lambda exc, fid=fid: answer(f"E {fid} {exc}".replace("\n", " ")))
        except Exception as exc:  # noqa: BLE001
            answer(f"E {fid} {exc}".replace("\n", " "))
            try:
                producer.close(timeout=0)
            except Exception:  # noqa: BLE001
                pass
            producer = None
    if producer is not None:
        try:
            producer.close(timeout=flush_timeout)
        except Exception:  # noqa: BLE001
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
