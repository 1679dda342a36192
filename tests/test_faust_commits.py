"""The Faust acked-offset fix (faust-streaming#596): commits keep advancing across restarts."""

from __future__ import annotations

import signal
import time
from collections import defaultdict

import pytest
from faust.transport.consumer import Consumer
from intervaltree import IntervalTree
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from detectors import MetricEvent
from stream_app.faust_fixes import AckedOffsets

TP = ("metrics", 0)


class _ConsumerState:
    """Just the attributes Faust's real ``Consumer._new_offset`` reads."""

    def __init__(self, acked_factory):
        self._acked = defaultdict(acked_factory)
        self._acked_index = defaultdict(set)
        self._gap = defaultdict(IntervalTree)
        self._committed_offset = defaultdict(lambda: None)


def _commit_rounds(acked_factory) -> list:
    state = _ConsumerState(acked_factory)
    state._committed_offset[TP] = 9
    # offsets 10..14 acked, 15..19 a gap (e.g. filtered messages) that was *also* acked: the gap fill
    # extends the list with offsets it already holds.
    for offset in range(10, 20):
        state._acked[TP].append(offset)
        state._acked_index[TP].add(offset)
    state._gap[TP].addi(15, 20)
    results = []
    for _ in range(2):
        new = Consumer._new_offset(state, TP)
        results.append(new)
        if new is not None:
            state._committed_offset[TP] = new - 1
    return results


def test_plain_list_duplicates_stall_the_commit_offset():
    # Faust's own list: the duplicate 15 ends the consecutive run early, the commit lags behind
    assert _commit_rounds(list)[0] == 16


def test_acked_offsets_commit_everything_acked_in_one_go():
    assert _commit_rounds(AckedOffsets) == [20, None]


def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    """The group's committed offsets on ``topic``, summed (read without joining the group)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return sum(consumer.committed(TopicPartition(topic, p)) or 0 for p in range(partitions))
    finally:
        consumer.close()


def _send(bootstrap: str, topic: str, start: int, count: int) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for step in range(start, start + count):
        run = f"run-{step % 5}"
        producer.send(topic, key=run.encode(), value=MetricEvent(run, step, {"loss": 1.0}).to_json())
    producer.flush()
    producer.close()


def _wait_committed(topics, target: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    value = -1
    while time.monotonic() < deadline:
        value = _committed(topics.bootstrap, topics.app_id, topics.name("metrics"), topics.partitions)
        if value >= target:
            return value
        time.sleep(0.5)
    return value


@pytest.mark.slow
def test_worker_restarted_twice_keeps_committing(topics, start_worker):
    total = 0
    for round_ in range(3):
        _send(topics.bootstrap, topics.name("metrics"), total, 60)
        total += 60
        worker = start_worker(data_dir=None)
        committed = _wait_committed(topics, total)
        worker.stop(signal.SIGTERM)
        assert committed == total, f"round {round_}: committed {committed} of {total}\n{worker.log()[-2000:]}"
