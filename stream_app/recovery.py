"""Table recovery that reads the whole changelog, even where the broker under-reports its end.

Faust recovers a table by reading its changelog up to the end offset the broker reports
(ListOffsets). The embedded broker under-reports that end for multi-record batches (STACK_NOTES.md), so
a worker taking over a partition stopped short and continued runs from stale state (seen as a run
summary missing the events of its last batch after a SIGKILL). :func:`install` wraps Faust's
highwater step: after the broker's answer, it reads each changelog partition on from there (in a
thread, a few hundred ms per recovery) and raises the highwater to the real last offset. On a broker
that reports the end correctly the probe finds nothing and changes nothing.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from producers.kafka_security import client_config

__all__ = ["install"]

_installed = False


def _real_ends(bootstrap: str, reported: dict[Any, int], quiet_s: float = 0.3,
               limit_s: float = 15.0) -> dict[Any, int]:
    """The offset after the last record of each partition, reading on from the reported end.

    "Nothing more" only counts once every partition has answered a fetch (``highwater`` known): a new
    consumer's first fetch can take longer than ``quiet_s`` on a loaded machine, and stopping before it
    answered would keep the under-reported end. ``limit_s`` bounds the whole probe.
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), **client_config(), group_id=None, enable_auto_commit=False,
                             fetch_max_wait_ms=20)
    ends = dict(reported)
    try:
        tps = {TopicPartition(tp.topic, tp.partition): tp for tp in reported}
        consumer.assign(list(tps))
        for ktp, tp in tps.items():
            consumer.seek(ktp, max(0, reported[tp]))
        deadline = time.monotonic() + limit_s
        quiet_since: float | None = None
        while time.monotonic() < deadline:
            for ktp, records in consumer.poll(timeout_ms=50).items():
                if records:
                    ends[tps[ktp]] = max(ends[tps[ktp]], records[-1].offset + 1)
                    if quiet_since is not None:
                        quiet_since = time.monotonic()
            if quiet_since is None:
                if all(consumer.highwater(ktp) is not None for ktp in tps):
                    quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                break
    finally:
        consumer.close()
    return ends


def install(bootstrap: str) -> None:
    """Patch Faust's recovery highwaters once per process."""
    global _installed
    if _installed:
        return
    from faust.tables.recovery import Recovery

    build = Recovery._build_highwaters

    async def _build_highwaters(self, consumer, tps, destination, title):
        await build(self, consumer, tps, destination, title)
        if not tps:
            return
        # Faust keeps highwater = end - 1 (the last offset); -1 for an empty partition
        reported = {tp: destination[tp] + 1 for tp in tps}
        ends = await asyncio.to_thread(_real_ends, bootstrap, reported)
        for tp in tps:
            destination[tp] = max(destination[tp], ends[tp] - 1)

    Recovery._build_highwaters = _build_highwaters
    _installed = True
