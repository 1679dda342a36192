"""Table recovery that reads the whole changelog, even where the broker under-reports its end.

Faust recovers a table by reading its changelog up to the end offset the broker reports
(ListOffsets). The bundled broker (Tansu) under-reports that end for multi-record batches (docs/stack.md),
so a worker taking over a partition stopped short and continued runs from stale state (seen as a run
summary missing the events of its last batch after a SIGKILL). :func:`install` wraps Faust's
highwater step: on a Tansu broker (known by its cluster id), after the broker's answer, it reads each
changelog partition on from there (in a thread, a few hundred ms per recovery), raises the highwater to
the real last offset, and turns off Faust's recovery consistency check (which compares the committed
offsets with the under-reported ends and raises ``ConsistencyError``). On any other broker — real Kafka —
nothing changes: the check stays on and no probe runs. ``tests/test_faust_fixes.py`` fails the day Tansu
reports the end correctly.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import warnings
from typing import Any

from producers.kafka_security import client_config

__all__ = ["TANSU_CLUSTER_ID", "check_upstream", "install", "is_tansu"]

_installed = False
#: the cluster id the bundled Tansu broker reports (DescribeCluster)
TANSU_CLUSTER_ID = "tansu_cluster"
_tansu: dict[str, bool] = {}


def is_tansu(bootstrap: str) -> bool:
    """Whether ``bootstrap`` is a Tansu broker (asked once per process; False when it cannot be asked)."""
    if bootstrap not in _tansu:
        from kafka import KafkaAdminClient

        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), **client_config(), request_timeout_ms=5000)
            try:
                _tansu[bootstrap] = admin.describe_cluster().get("cluster_id") == TANSU_CLUSTER_ID
            finally:
                admin.close()
        except Exception:  # noqa: BLE001 — unknown broker: no workaround, Faust as it is
            return False
    return _tansu[bootstrap]


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


def check_upstream() -> None:
    """Raise ``faust_fixes.UnexpectedUpstream`` unless Faust's recovery is the code the probe was written for."""
    from faust.tables.recovery import Recovery

    from .faust_fixes import _expect, _source, upstream

    build = upstream.get("Recovery._build_highwaters", Recovery._build_highwaters)
    _expect(list(inspect.signature(build).parameters) == ["self", "consumer", "tps", "destination", "title"]
            and "value - 1 if value is not None else -1" in _source(build),
            "Recovery._build_highwaters is no longer (consumer, tps, destination, title) keeping end - 1")
    restart = Recovery._restart_recovery  # a mode ServiceTask: its function is .fun
    _expect("self.app.conf.recovery_consistency_check" in _source(getattr(restart, "fun", restart)),
            "Recovery._restart_recovery no longer reads conf.recovery_consistency_check at recovery time")


def install(bootstrap: str) -> None:
    """Patch Faust's recovery highwaters once per process."""
    global _installed
    if _installed:
        return
    from faust.exceptions import AlreadyConfiguredWarning
    from faust.tables.recovery import Recovery

    from .faust_fixes import upstream

    check_upstream()
    build = upstream["Recovery._build_highwaters"] = Recovery._build_highwaters

    async def _build_highwaters(self, consumer, tps, destination, title):
        await build(self, consumer, tps, destination, title)
        if not tps or not await asyncio.to_thread(is_tansu, bootstrap):
            return
        if self.app.conf.recovery_consistency_check:
            with warnings.catch_warnings():  # read by recovery only, after this step: late is in time
                warnings.simplefilter("ignore", AlreadyConfiguredWarning)
                self.app.conf.recovery_consistency_check = False
        # Faust keeps highwater = end - 1 (the last offset); -1 for an empty partition
        reported = {tp: destination[tp] + 1 for tp in tps}
        ends = await asyncio.to_thread(_real_ends, bootstrap, reported)
        for tp in tps:
            destination[tp] = max(destination[tp], ends[tp] - 1)

    Recovery._build_highwaters = _build_highwaters
    _installed = True
