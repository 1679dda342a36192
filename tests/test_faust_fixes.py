"""The adjustments to Faust and the Tansu workaround: each bug shown in the upstream code (these tests
fail the day upstream fixes it: then drop the adjustment), each adjustment refusing code it was not
written for, and the recovery workaround applying to the bundled broker only (docs/stack.md)."""

from __future__ import annotations

import asyncio
import contextvars
import warnings
from types import SimpleNamespace

import pytest
from faust.transport.consumer import Consumer
from intervaltree import Interval, IntervalTree
from kafka import KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from mode.utils.queues import FlowControlEvent, FlowControlQueue

from stream_app import faust_fixes, recovery
from stream_app.broker import free_port

faust_fixes.install(10)  # as the worker does; the upstream originals are kept in faust_fixes.upstream


def _new_offset(acked: list[int]) -> tuple[int | None, list[int]]:
    """Upstream ``Consumer._new_offset`` for a partition whose offsets 5–7 were acked, a gap record for 6–7
    (offsets the consumer saw skipped, then acked all the same) and offset 4 committed."""
    consumer = SimpleNamespace(_acked={"tp": acked}, _gap={"tp": IntervalTree([Interval(6, 8)])},
                               _committed_offset={"tp": 4}, _acked_index={"tp": set(acked)})
    return Consumer._new_offset(consumer, "tp"), consumer._acked["tp"]


def test_canary_duplicate_acked_offsets_stop_the_commit_upstream_and_not_with_acked_offsets():
    # faust-streaming#596: the gap's offsets are appended again; the commit stops at the first duplicate
    assert _new_offset([5, 6, 7]) == (7, [6, 7, 7])
    assert _new_offset(faust_fixes.AckedOffsets([5, 6, 7])) == (8, [])


def test_canary_faust_hard_codes_the_fetch_wait():
    source = faust_fixes._source(faust_fixes.upstream["_create_worker_consumer"])
    assert "fetch_max_wait_ms=1500" in source


def test_canary_resuming_running_flow_control_drops_queued_records_upstream_and_not_once_fixed():
    async def queued_after_resume(resume) -> int:
        flow = FlowControlEvent(initially_suspended=False)
        queue = FlowControlQueue(flow_control=flow, clear_on_resume=True)
        queue.put_nowait("record already marked read")
        resume(flow)  # what Faust does at the end of every table recovery, with flow control running
        return queue.qsize()

    assert asyncio.run(queued_after_resume(faust_fixes.upstream["FlowControlEvent.resume"])) == 0
    assert asyncio.run(queued_after_resume(FlowControlEvent.resume)) == 1

    async def cleared_after_suspension() -> int:  # what the clear is for is kept
        flow = FlowControlEvent(initially_suspended=False)
        queue = FlowControlQueue(flow_control=flow, clear_on_resume=True)
        flow.suspend()
        queue.put_nowait("fetched before a rebalance")
        flow.resume()
        return queue.qsize()

    assert asyncio.run(cleared_after_suspension()) == 0


def _three_records_in_partitions_0_and_1(topics) -> None:
    producer = KafkaProducer(bootstrap_servers=topics.bootstrap)
    for partition in (0, 1):
        for i in range(3):
            producer.send(topics.name("metrics"), key=b"run", value=b"%d" % i, partition=partition)
    producer.flush()
    producer.close()


def _positions_after_seek(topics, seek, group: str, *, reset: str = "earliest", acked: bool = True) -> dict[int, int]:
    """Where a consumer in ``group`` of the metrics partitions 0 (nothing committed) and 1 (offset 2
    committed), 3 records each, stands after ``seek`` — Faust's ``AIOKafkaConsumerThread.seek_to_committed``
    on a real aiokafka consumer — once it has fetched the records and dropped them, as Faust's consumer
    drops the records of a partition it has paused (the positions are past them)."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import OffsetAndMetadata
    from aiokafka.structs import TopicPartition as AioTP

    topic = topics.name("metrics")
    tps = [AioTP(topic, 0), AioTP(topic, 1)]

    async def call_thread(fun, *args):
        return await fun(*args)

    async def run() -> dict[int, int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=topics.bootstrap, group_id=f"{topics.app_id}-{group}",
                                    enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=50)
        await consumer.start()
        try:
            consumer.assign(tps)
            await consumer.commit({tps[1]: OffsetAndMetadata(2, "")})
            for _ in range(100):  # bounded: the 6 records come in a few fetches
                await consumer.getmany(*tps, timeout_ms=100)
                if [await consumer.position(tp) for tp in tps] == [3, 3]:
                    break
            assert [await consumer.position(tp) for tp in tps] == [3, 3]
            thread = SimpleNamespace(  # Faust's consumer thread, down to what the seek reads
                app=SimpleNamespace(conf=SimpleNamespace(consumer_auto_offset_reset=reset),
                                    topics=SimpleNamespace(acks_enabled_for=lambda name: acked and name == topic)),
                call_thread=call_thread, _ensure_consumer=lambda: consumer)
            await seek(thread)
            return {tp.partition: await consumer.position(tp) for tp in tps}
        finally:
            await consumer.stop()

    return asyncio.run(run())


def test_canary_records_dropped_in_a_partition_with_nothing_committed_are_skipped_upstream_and_not_once_fixed(topics):
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    _three_records_in_partitions_0_and_1(topics)
    upstream_seek = faust_fixes.upstream["AIOKafkaConsumerThread.seek_to_committed"]
    # partition 0: its 3 records are never fetched again
    assert _positions_after_seek(topics, upstream_seek, "upstream") == {0: 3, 1: 2}
    assert _positions_after_seek(topics, AIOKafkaConsumerThread.seek_to_committed, "fixed") == {0: 0, 1: 2}


@pytest.mark.parametrize("reset, acked", [("latest", True), ("earliest", False)])
def test_only_acked_partitions_of_an_earliest_consumer_are_sought_to_their_beginning(topics, reset, acked):
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    # a "latest" consumer started past records that a seek to the beginning would bring back; changelog
    # partitions (not acked) are read by the table recovery, from its own offsets
    _three_records_in_partitions_0_and_1(topics)
    seek = AIOKafkaConsumerThread.seek_to_committed
    assert _positions_after_seek(topics, seek, "fixed", reset=reset, acked=acked) == {0: 3, 1: 2}
_handed_to = contextvars.ContextVar("handed_to", default=None)


def _handing_consumer(callback) -> SimpleNamespace:
    """What ``Consumer.wait_first`` reads of a consumer: its record callback, flow and service events."""
    return SimpleNamespace(callback=callback, suspend_flow=asyncio.Event(), _stopped=asyncio.Event(),
                           _crashed=asyncio.Event(), loop=asyncio.get_running_loop())


async def _hand_over(gate: asyncio.Future | None = None) -> asyncio.Task | None:
    """A record's hand-over (the consumer's callback): waits on ``gate`` if given, says which task ran it."""
    _handed_to.set("set by the hand-over")
    if gate is not None:
        await gate
    return asyncio.current_task()


def test_canary_upstream_hands_each_record_over_in_tasks_of_its_own_and_the_fix_at_once():
    async def handed_in_tasks(wait_first) -> tuple[bool, int]:
        consumer = _handing_consumer(_hand_over)
        before = len(asyncio.all_tasks())
        started = []
        loop = asyncio.get_running_loop()
        factory = loop.get_task_factory()
        loop.set_task_factory(lambda lp, coro, **kw: started.append(1) or asyncio.Task(coro, loop=lp, **kw))
        try:
            done = await wait_first(consumer, _hand_over(), consumer.suspend_flow.wait())
        finally:
            loop.set_task_factory(factory)
        await asyncio.sleep(0)  # the cancelled waits end
        assert len(asyncio.all_tasks()) == before
        return done.results[0] is not asyncio.current_task(), len(started)

    # upstream: the hand-over, the suspension, the stop and the crash each in a task, for every record
    assert asyncio.run(handed_in_tasks(faust_fixes.upstream["Consumer.wait_first"])) == (True, 4)
    assert asyncio.run(handed_in_tasks(Consumer.wait_first)) == (False, 0)


def test_a_hand_over_runs_at_once_in_a_context_of_its_own_and_leaves_no_coroutine_unawaited():
    async def main() -> None:
        consumer = _handing_consumer(_hand_over)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "coroutine ... was never awaited" would be one
            done = await Consumer.wait_first(consumer, _hand_over(), consumer.suspend_flow.wait())
        assert done.done and not done.stopped
        assert _handed_to.get() is None  # set inside the hand-over's context only, as in a task

    asyncio.run(main())


def test_a_hand_over_that_waits_finishes_in_a_task_and_the_suspension_still_cuts_it_short():
    async def main() -> None:
        consumer = _handing_consumer(_hand_over)
        gate = asyncio.get_running_loop().create_future()  # a full queue, say
        asyncio.get_running_loop().call_later(0.01, gate.set_result, None)
        done = await Consumer.wait_first(consumer, _hand_over(gate), consumer.suspend_flow.wait())
        assert done.results[0] is not asyncio.current_task() and not done.stopped
        assert _handed_to.get() is None

        stuck = asyncio.get_running_loop().create_future()  # never set: the queue stays full
        asyncio.get_running_loop().call_later(0.01, consumer.suspend_flow.set)  # a rebalance suspends the flow
        handed = _hand_over(stuck)
        done = await asyncio.wait_for(Consumer.wait_first(consumer, handed, consumer.suspend_flow.wait()), 5)
        assert done.results == [True]  # the suspension won
        await asyncio.sleep(0)
        assert stuck.cancelled()  # the waiting hand-over was cancelled, as upstream cancels its task

    asyncio.run(main())


def test_a_hand_over_that_raises_raises_in_the_consumer():
    async def broken(message: object) -> None:
        raise ValueError("a decoder bug")

    async def main() -> None:
        consumer = _handing_consumer(broken)
        with pytest.raises(ValueError, match="a decoder bug"):
            await Consumer.wait_first(consumer, broken(None), consumer.suspend_flow.wait())

    asyncio.run(main())


def _rewritten_upstream(*_args):
    return None


@pytest.mark.parametrize("name, says", [
    ("FlowControlEvent.resume", "FlowControlEvent.resume"),
    ("_create_worker_consumer", "fetch_max_wait_ms=1500"),
    ("Consumer.__init__", "Consumer.__init__"),
    ("AIOKafkaConsumerThread.seek_to_committed", "seek_to_committed"),
    ("Consumer.wait_first", "wait_first"),
])
def test_an_upstream_that_is_not_the_expected_code_is_refused_with_what_changed(monkeypatch, name, says):
    faust_fixes.check_upstream()  # the installed versions pass
    recovery.check_upstream()
    monkeypatch.setitem(faust_fixes.upstream, name, _rewritten_upstream)
    with pytest.raises(faust_fixes.UnexpectedUpstream, match=says) as refused:
        faust_fixes.check_upstream()
    assert "faust-streaming>=0.15,<0.16" in str(refused.value)


def test_a_changed_recovery_upstream_is_refused(monkeypatch):
    recovery.install("127.0.0.1:1")  # as the worker does (nothing connects until a recovery)
    recovery.check_upstream()  # the original, not the wrapper, is checked
    monkeypatch.setitem(faust_fixes.upstream, "Recovery._build_highwaters", _rewritten_upstream)
    with pytest.raises(faust_fixes.UnexpectedUpstream, match="_build_highwaters"):
        recovery.check_upstream()


def test_a_fixed_new_offset_upstream_is_refused(monkeypatch):
    monkeypatch.setattr(Consumer, "_new_offset", _rewritten_upstream)
    with pytest.raises(faust_fixes.UnexpectedUpstream, match="faust-streaming#596"):
        faust_fixes.check_upstream()


def test_canary_tansu_under_reports_the_end_of_a_multi_record_batch(topics):
    """The fact behind recovery.py and BUNDLED_BROKER_WORKER_ENV: fails once the broker reports the end."""
    topic = topics.name("metrics")
    producer = KafkaProducer(bootstrap_servers=topics.bootstrap, linger_ms=200, batch_size=1 << 20)
    for i in range(5):
        producer.send(topic, key=b"run", value=b"%d" % i, partition=0)
    producer.flush()
    producer.close()
    admin = KafkaAdminClient(bootstrap_servers=topics.bootstrap)
    try:
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(bootstrap_servers=topics.bootstrap, group_id=None)
        reported = consumer.end_offsets([TopicPartition(topic, 0)])[TopicPartition(topic, 0)]
        consumer.close()
        real = recovery._real_ends(topics.bootstrap, {TopicPartition(topic, 0): reported})
    finally:
        admin.close()
    assert reported < 5 == real[TopicPartition(topic, 0)]


def test_the_recovery_workaround_knows_the_bundled_broker_from_another(topics):
    assert recovery.is_tansu(topics.bootstrap)
    assert not recovery.is_tansu(f"127.0.0.1:{free_port()}")  # no broker: no workaround
