"""Five small, documented adjustments to faust-streaming, installed once by :func:`install`, and one helper.

1. **Duplicate acked offsets stop commits** (faust-streaming#596, robinhood/faust#625). When
   ``Consumer._new_offset`` fills gaps it ``extend``-s the per-partition acked list with offsets that
   may already be in it; the sorted list then holds a duplicate, ``consecutive_numbers`` ends its first
   run there, and from then on the committed offset stops advancing — the next restart replays
   everything since. :class:`AckedOffsets` is a list whose ``extend`` skips offsets it already holds,
   so the commit computation always sees each offset once.

2. **Fetch wait.** Faust hard-codes aiokafka ``fetch_max_wait_ms=1500``; against a broker that holds
   fetches that long, alert latency is ~0.4 s p50. We set the consumer's fetch wait from settings
   (default 10 ms) right after Faust creates it and before it starts.

3. **Records lost at the end of a recovery.** Resuming the app's flow control clears every channel
   queue (mode's ``FlowControlEvent.resume``), and Faust resumes it once more at the end of every table
   recovery, where it is already running: it resumes the stream partitions, awaits their seek to the
   committed offsets — the fetcher hands records to the agent's queue meanwhile — and then calls
   ``resume()``. A record waiting in the queue at that moment had been marked read: it was never
   processed and never fetched again. A worker taking over partitions lost a record in about one takeover
   in six (``tests/test_scale.py``: a run ending with 31 of 32 steps, a NaN that raised no alert). The
   queues are now cleared only when flow control really resumes from a suspension — what the clear is for:
   dropping records fetched before a rebalance. A record fetched before the seek may then be processed
   twice; the run summary counts the second as a duplicate.

4. **Records lost in a partition that has no committed offset yet.** Faust drops records it has
   fetched but cannot hand on at the moment: those of a partition it has just paused (in
   ``Consumer.getmany``) and the rest of a batch once the flow stops for a rebalance. aiokafka's
   position has moved past them all the same; Faust gets them back by seeking every partition to its
   committed offset after each rebalance (``Consumer.perform_seek``). But aiokafka's
   ``seek_to_committed`` seeks only where an offset above 0 was committed: in a partition of which the
   group has committed nothing the dropped records were never fetched again. It happened to a worker
   that took over from one killed before its first commit: while its table recovery ended, an aiokafka
   fetch for the changelog partitions woke up when Faust had just paused them all (an empty set of
   partitions means *every* partition to aiokafka's ``fetched_records``), drained the metrics records
   0–17 that Faust then dropped as paused, and the worker went on from offset 18 (the run lost a
   re-delivered step and the whole replay: ``tests/test_stream_app.py`` failed in 4 of 23 runs on a
   loaded 2-core machine). A partition whose records the worker acks, with nothing committed, is now
   sought to its beginning at that seek, as the consumer's ``auto_offset_reset="earliest"`` placed it
   when it was assigned: the records are fetched again (those already processed count as duplicates).
   Changelog partitions are left alone (the table recovery seeks them itself), and so is a consumer
   with another reset policy (where it started is not known).
5. **Four tasks for every record.** The consumer hands each fetched record to the agents' queues with
   ``wait_first(callback(message), suspend_flow.wait())``: four tasks (the hand-over, and waits on the
   suspension, the stop and the crash), ``asyncio.wait`` and three cancellations, per record — 18 % of
   the worker's CPU on a backlog of single events (py-spy, sampling the thread that holds the GIL). The hand-over almost never waits (it waits on a full
   queue, a suspended flow or a full producer buffer). It is now run at once, in a copy of the context as
   a task would run it; only when it has to wait does the rest of it go into a task, raced against the
   suspension through the upstream ``wait_first`` as before. With the flow suspended, or the consumer
   stopped or crashed, every record takes the upstream path.

:func:`as_current` makes an event the stream's current one for a table write made after the stream has
moved on to later records (the agent saves a run's state once per burst of records): Faust's tables and
stores take the changelog partition and the RocksDB partition of a write from the current event.

Each adjustment replaces a piece of faust-streaming 0.15.x (or mode-streaming 0.7) that :func:`check_upstream`
first finds as it expects (the code that has the bug); anything else — a fixed or rewritten upstream —
stops the worker with :class:`UnexpectedUpstream` instead of patching code we have not read. The tests
in ``tests/test_faust_fixes.py`` show each bug in the upstream code, and fail the day it is fixed.
See docs/stack.md for the measured facts behind them.
"""

from __future__ import annotations

import contextvars
import inspect
import types
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["AckedOffsets", "UnexpectedUpstream", "as_current", "check_upstream", "install", "seek_to_committed_or_start",
           "upstream"]

_installed = False
_fetch_max_wait_ms = 1500
#: the upstream functions the adjustments replace, by name (the tests read the bugs in them)
upstream: dict[str, Any] = {}


class UnexpectedUpstream(RuntimeError):
    """faust-streaming / mode-streaming / aiokafka is not the code an adjustment was written for."""


def _expect(found: bool, what: str) -> None:
    if not found:
        import faust

        raise UnexpectedUpstream(
            f"lossguard's Faust adjustments were written for faust-streaming 0.15.x, but {what} "
            f"(installed: faust-streaming {faust.__version__}). Install the tested range "
            "(pip install 'faust-streaming>=0.15,<0.16') or review stream_app/faust_fixes.py for this version.")


def _source(obj: Any) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def check_upstream() -> None:
    """Raise :class:`UnexpectedUpstream` unless each piece the adjustments replace is the code they expect."""
    import aiokafka
    from faust import streams
    from faust.transport import consumer as consumer_module
    from faust.transport.drivers import aiokafka as driver
    from mode.utils.queues import FlowControlEvent

    consumer = consumer_module.Consumer
    _expect("self._acked = defaultdict(list)" in _source(upstream.get("Consumer.__init__", consumer.__init__)),
            "Consumer.__init__ no longer makes the acked lists as defaultdict(list)")
    _expect("acked.extend(stuff_to_add)" in _source(consumer._new_offset),
            "Consumer._new_offset no longer extends the acked list with the gap offsets (faust-streaming#596)")
    create = upstream.get("_create_worker_consumer", driver.AIOKafkaConsumerThread._create_worker_consumer)
    _expect("fetch_max_wait_ms=1500" in _source(create),
            "AIOKafkaConsumerThread._create_worker_consumer no longer hard-codes fetch_max_wait_ms=1500")
    _expect("fetch_max_wait_ms=self._fetch_max_wait_ms" in _source(aiokafka.AIOKafkaConsumer.start),
            "aiokafka's AIOKafkaConsumer.start no longer reads self._fetch_max_wait_ms")
    resume = upstream.get("FlowControlEvent.resume", FlowControlEvent.resume)
    _expect("self.clear()" in _source(resume) and "_suspend" in _source(FlowControlEvent.__init__),
            "mode's FlowControlEvent.resume no longer clears the queues unconditionally")
    _expect("callback(message), self.suspend_flow.wait()" in _source(consumer._drain_messages)
            and _source(consumer._drain_messages).count("wait_first(") == 1,
            "Consumer._drain_messages no longer hands each record over with wait_first(callback(message), ...)")
    wait_first = upstream.get("Consumer.wait_first", consumer.wait_first)
    _expect("asyncio.ensure_future" in _source(wait_first) and "WaitResults(winners, results, False)" in _source(wait_first),
            "mode's Service.wait_first no longer makes a task per awaitable and returns WaitResults")
    _expect(type(getattr(streams, "_current_event", None)).__name__ == "ContextVar",
            "faust.streams._current_event is no longer the ContextVar of the current event")
    seek = upstream.get("AIOKafkaConsumerThread.seek_to_committed", driver.AIOKafkaConsumerThread.seek_to_committed)
    _expect("call_thread(self._ensure_consumer().seek_to_committed)" in _source(seek),
            "AIOKafkaConsumerThread.seek_to_committed no longer calls aiokafka's seek_to_committed")
    _expect("if offset and offset > 0:" in _source(aiokafka.AIOKafkaConsumer.seek_to_committed),
            "aiokafka's AIOKafkaConsumer.seek_to_committed no longer skips partitions with no committed offset")
    _expect("await self.perform_seek()" in _source(consumer.getmany),
            "Consumer.getmany no longer seeks back to the committed offsets when it drops records")


class AckedOffsets(list):
    """The acked-offsets list of one partition, never holding the same offset twice."""

    def extend(self, offsets: Iterable[int]) -> None:
        present = set(self)
        fresh = []
        for offset in offsets:
            if offset not in present:
                present.add(offset)
                fresh.append(offset)
        super().extend(fresh)


@contextmanager
def as_current(event: Any) -> Iterator[None]:
    """Within the block, ``faust.streams.current_event()`` is ``event``."""
    from faust.streams import _current_event

    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


async def seek_to_committed_or_start(consumer: Any, from_start: Callable[[Any], bool]) -> dict[Any, int | None]:
    """aiokafka's ``seek_to_committed`` for every assigned partition, and to the beginning each one with
    nothing committed (None, or 0) for which ``from_start(tp)`` holds. Returns the committed offsets."""
    committed = await consumer.seek_to_committed()
    fresh = [tp for tp, offset in committed.items() if not offset and from_start(tp)]
    if fresh:
        await consumer.seek_to_beginning(*fresh)
    return committed
@types.coroutine
def _carry_on(coro: Any, yielded: Any) -> Any:
    """The rest of ``coro``, which has already run up to yielding ``yielded``: what ``yield from coro`` does
    from there (what the task sends or throws in goes on to ``coro``)."""
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # noqa: BLE001 — a cancellation or error thrown in: it is coro's
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def _finish(coro: Any, yielded: Any) -> Any:
    return await _carry_on(coro, yielded)


def _handing_over(consumer: Any, coros: tuple, timeout: Any) -> bool:
    """Whether this ``wait_first`` call is the consumer handing a record to the agents, with the flow
    running: the call the fast path takes."""
    if len(coros) != 2 or timeout is not None or not inspect.iscoroutine(coros[0]):
        return False
    code = getattr(consumer.callback, "__code__", None)
    return (code is not None and coros[0].cr_code is code and not consumer.suspend_flow.is_set()
            and not consumer._stopped.is_set() and not consumer._crashed.is_set())


def install(fetch_max_wait_ms: int = 10) -> None:
    """Apply the five adjustments (idempotent; the fetch wait follows the latest call)."""
    global _installed, _fetch_max_wait_ms
    _fetch_max_wait_ms = int(fetch_max_wait_ms)
    if _installed:
        return
    check_upstream()
    from faust.transport import consumer as consumer_module
    from faust.transport.drivers import aiokafka as driver

    base_init = upstream["Consumer.__init__"] = consumer_module.Consumer.__init__

    def __init__(self, *args, **kwargs):  # noqa: N807
        base_init(self, *args, **kwargs)
        self._acked = defaultdict(AckedOffsets)

    consumer_module.Consumer.__init__ = __init__

    create = upstream["_create_worker_consumer"] = driver.AIOKafkaConsumerThread._create_worker_consumer

    def _create_worker_consumer(self, transport):
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = _fetch_max_wait_ms  # read by the fetcher built in start()
        return consumer

    driver.AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer

    from mode.utils.queues import FlowControlEvent

    resume = upstream["FlowControlEvent.resume"] = FlowControlEvent.resume

    def resume_after_suspension(self) -> None:
        if self._suspend.is_set():  # a real resume: the queues hold records from before the suspension
            resume(self)

    FlowControlEvent.resume = resume_after_suspension

    upstream["AIOKafkaConsumerThread.seek_to_committed"] = driver.AIOKafkaConsumerThread.seek_to_committed

    async def seek_to_committed(self):
        app = self.app
        earliest = app.conf.consumer_auto_offset_reset == "earliest"  # else: where the start was is not known
        acked = app.topics.acks_enabled_for  # the partitions Faust commits (not the changelogs)
        return await self.call_thread(seek_to_committed_or_start, self._ensure_consumer(),
                                      lambda tp: earliest and acked(tp.topic))

    driver.AIOKafkaConsumerThread.seek_to_committed = seek_to_committed
    from mode.services import WaitResults

    base_wait_first = upstream["Consumer.wait_first"] = consumer_module.Consumer.wait_first

    async def wait_first(self, *coros, timeout=None):
        if not _handing_over(self, coros, timeout):
            return await base_wait_first(self, *coros, timeout=timeout)
        handed, suspended = coros
        context = contextvars.copy_context()  # as a task runs it
        try:
            yielded = context.run(handed.send, None)
        except StopIteration as done:  # handed over without waiting: the usual case
            suspended.close()
            return WaitResults([handed], [done.value], False)
        except BaseException:
            suspended.close()
            raise
        # it waits: the rest in a task, raced against the suspension as upstream does
        rest = self.loop.create_task(_finish(handed, yielded), context=context)
        return await base_wait_first(self, rest, suspended)

    consumer_module.Consumer.wait_first = wait_first
    _installed = True
