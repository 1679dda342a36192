"""Per-run aggregates the CLI, dashboard and reports read: step order, counts, tumbling windows.

:class:`RunSummary` answers, for one run: is this event new, a re-delivery, a late step, or the first
step of a resumed run? — and keeps tumbling windows of ``window_s`` seconds (event time) with, per
metric, count/min/max/mean, plus the alerts raised in the window. The stream app keeps one per run in
the changelog-backed ``run_summary`` table, so they survive restarts and rebalances like detector state.

Step order, explicitly (at-least-once delivery and checkpoint restores both happen in practice):

- ``new``: the step is past the last one seen → fed to the detectors.
- ``resumed``: a step seen before, from a new attempt (the ``attempt`` tag changed), or — for a source
  without attempts — a step that went back while the timestamp moved on → a checkpoint restore; fed to
  the detectors (their windows carry on: the pre-restore history is still the run's baseline).
- ``same_step``: the last step again, later, from the same attempt (an evaluation reported after its
  step) → fed to the detectors, counted as an event, not as a resume.
- ``duplicate``: step and time not past the last ones and the step was seen recently → dropped.
- ``out_of_order``: a late step older than the last one, never seen → dropped and counted (detector
  windows are sequential; a late step cannot be inserted behind them).

>>> from detectors import MetricEvent
>>> s = RunSummary("r")
>>> [s.observe(MetricEvent("r", step, {"loss": 1.0}, ts=ts)) for step, ts in
...  [(1, 10.0), (3, 11.0), (3, 11.0), (2, 10.5), (4, 12.0), (2, 13.0)]]
['new', 'new', 'duplicate', 'out_of_order', 'new', 'resumed']
>>> s.events, s.duplicates, s.out_of_order, s.resumes, s.last_step
(4, 1, 1, 1, 2)
>>> a = RunSummary("r")
>>> [a.observe(MetricEvent("r", step, m, ts=ts, tags={"attempt": att})) for step, m, ts, att in
...  [(5, {"loss": 1.0}, 1.0, "0"), (5, {"val_loss": 1.1}, 2.0, "0"), (4, {"loss": 1.0}, 0.5, "1")]]
['new', 'same_step', 'resumed']
>>> s.windows[-1]["metrics"]["loss"]
{'count': 4, 'min': 1.0, 'max': 1.0, 'mean': 1.0}
"""

from __future__ import annotations

import math
from bisect import bisect_left
from operator import attrgetter, le, lt
from typing import Any

from detectors import SEVERITIES, Alert, MetricEvent

from .history import History

__all__ = ["RunSummary"]

_STEP, _TS, _SOURCE, _TAGS = attrgetter("step"), attrgetter("ts"), attrgetter("source"), attrgetter("tags")
#: how many recent steps a run remembers to tell a re-delivery from a late step
_RECENT_STEPS = 32


class RunSummary:
    """Counts, step order and tumbling-window aggregates of one run (serializable)."""

    def __init__(self, run_id: str, window_s: float = 60.0, keep_windows: int = 10):
        self.run_id = run_id
        self.window_s = window_s
        self.keep_windows = keep_windows
        self.source = ""
        self.tags: dict[str, str] = {}
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self.last_step: int | None = None
        self.events = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.resumes = 0
        self.alerts = dict.fromkeys(SEVERITIES, 0)
        self.recent_steps: list[int] = []
        #: the worker's clock (unix seconds) when it last saved a record of the run: how long a run has been
        #: silent is measured on this clock, not against the producer's timestamps (a replay, a skewed clock)
        self.seen_at: float | None = None
        #: oldest first: {"start", "count", "alerts", "metrics": {name: [n, min, max, sum]}, "nonfinite"}
        self._windows: list[dict[str, Any]] = []
        #: the charts' bounded, downsampled series (stream_app.history)
        self.history = History()

    def observe(self, event: MetricEvent) -> str:
        """Classify ``event`` (see the module docstring) and, unless dropped, add it to the aggregates."""
        if self.last_step is not None and event.step <= self.last_step:
            attempt = event.tags.get("attempt") if event.tags else None
            last_attempt = self.tags.get("attempt")
            if attempt is not None and last_attempt is not None and attempt != last_attempt:
                kind = "resumed"
                self.resumes += 1
            elif event.step == self.last_step and event.ts > self.last_ts and attempt is not None:
                kind = "same_step"
            elif event.ts > self.last_ts:
                kind = "resumed"
                self.resumes += 1
            elif event.step in self.recent_steps:
                self.duplicates += 1
                return "duplicate"
            else:
                self.out_of_order += 1
                return "out_of_order"
        else:
            kind = "new"
        self._add(event)
        return kind

    def observe_new(self, events: list[MetricEvent]) -> bool:
        """:meth:`observe` for every event of a record known to be ``new``, one pass per metric and
        window: steps past the last one seen, in time order, from one source with one set of tags (what
        a producer's batch is). False, with nothing changed, for any other record."""
        first = events[0]
        if len(events) == 1:  # a single event (any producer but lossguard's reporter): observe()'s new path
            if self.last_step is not None and first.step <= self.last_step:
                return False
            self._add(first)
            return True
        if self.last_step is not None and first.step <= self.last_step:
            return False
        # each test over the whole record in C: steps rising, times not falling, one source, one set of tags
        n = len(events)
        steps, times = list(map(_STEP, events)), list(map(_TS, events))
        sources, tags = list(map(_SOURCE, events)), list(map(_TAGS, events))
        if not (all(map(lt, steps, steps[1:])) and all(map(le, times, times[1:]))
                and sources.count(first.source) == n and tags.count(first.tags) == n):
            return False
        names = tuple(first.metrics)
        # the same metrics, in the same order, at every step (a producer's batch): the columns by one
        # transposition in C, for the chart history and the window aggregates both
        columns = (dict(zip(names, zip(*[e.metrics.values() for e in events], strict=True), strict=True))
                   if all(tuple(e.metrics) == names for e in events) else None)
        self._take(events, columns)
        window_start = self._window_start
        if window_start(first.ts) == window_start(events[-1].ts):  # times only go forward: one window
            self._add_to_window(events, columns)
            return True
        begin = 0
        while begin < len(events):  # the record's steps window by window
            start = window_start(times[begin])
            # the window's end by bisection, confirmed by the rounding of its last and the next time
            end = bisect_left(times, start + self.window_s, begin + 1)
            if window_start(times[end - 1]) != start or (end < len(times) and window_start(times[end]) == start):
                end = begin + 1
                while end < len(events) and window_start(times[end]) == start:
                    end += 1
            self._add_to_window(events[begin:end])
            begin = end
        return True

    def _add_to_window(self, events: list[MetricEvent], columns: dict[str, tuple[float, ...]] | None = None) -> None:
        """Aggregate ``events``, all of one window, into it (``columns``: their values by metric, when every
        event has the same metrics in the same order)."""
        window = self._open_window(events[0].ts)
        if window is None:
            return
        window["count"] += len(events)
        stats = window["metrics"]
        if columns is None:
            names = tuple(events[0].metrics)
            if any(tuple(e.metrics) != names for e in events):
                for event in events:
                    self._aggregate(window, stats, event.metrics)
                return
            # the same metrics, in the same order, at every step: the columns by one transposition in C
            columns = dict(zip(names, zip(*[e.metrics.values() for e in events], strict=True), strict=True))
        for name, values in columns.items():
            total = sum(values)
            if not math.isfinite(total):
                for value in values:
                    self._aggregate(window, stats, {name: value})
                continue
            acc = stats.get(name)
            if acc is None:
                stats[name] = [len(values), min(values), max(values), total]
            else:
                acc[0] += len(values)
                acc[1] = min(acc[1], *values)
                acc[2] = max(acc[2], *values)
                acc[3] = sum(values, acc[3])

    def count_alert(self, alert: Alert) -> None:
        if alert.status != "firing":
            return
        self.alerts[alert.severity] += 1
        window = self._window_for(alert.ts)
        if window is not None:
            window["alerts"] += 1

    def _add(self, event: MetricEvent) -> None:
        self._take([event])
        window = self._open_window(event.ts)
        if window is None:
            return
        window["count"] += 1
        self._aggregate(window, window["metrics"], event.metrics)

    def _take(self, events: list[MetricEvent], columns: dict[str, tuple[float, ...]] | None = None) -> None:
        """Count consecutive new ``events`` into the run's position, source, tags and recent steps."""
        first, last = events[0], events[-1]
        self.events += len(events)
        self.last_step, self.last_ts = last.step, last.ts
        if self.first_ts is None:
            self.first_ts = first.ts
        self.source = last.source
        if last.tags and last.tags != self.tags:  # a copy, replaced (never changed in place) on a change
            self.tags = dict(last.tags)
        recent = self.recent_steps
        recent.extend(e.step for e in events)
        del recent[:-_RECENT_STEPS]
        history = self.history
        if len(events) == 1:
            history.add(first.step, first.metrics)
            return
        steps = [e.step for e in events]
        if columns is not None:
            for name in history.metrics.intersection(columns):
                history.add_column(name, steps, columns[name])
            return
        # every charted metric of the record, also those logged at some steps only (a validation loss)
        for name in history.metrics.intersection(set().union(*[e.metrics.keys() for e in events])):
            column = [e.metrics.get(name) for e in events]
            if None in column:  # not logged at every step of the record
                pairs = [(s, v) for s, v in zip(steps, column, strict=True) if v is not None]
                history.add_column(name, [s for s, _ in pairs], [v for _, v in pairs])
            else:
                history.add_column(name, steps, column)

    def _window_start(self, ts: float) -> float:
        return math.floor(ts / self.window_s) * self.window_s

    def _open_window(self, ts: float) -> dict[str, Any] | None:
        """The window ``ts`` falls in, opened when it is past the newest; None for a step whose window
        has closed (a late step)."""
        windows = self._windows
        if windows and windows[-1]["start"] == self._window_start(ts):
            return windows[-1]
        return self._window_for(ts, create=True)

    @staticmethod
    def _aggregate(window: dict[str, Any], stats: dict[str, list], metrics: dict[str, float]) -> None:
        for name, x in metrics.items():
            if not math.isfinite(x):
                window["nonfinite"] += 1
                continue
            acc = stats.get(name)
            if acc is None:
                stats[name] = [1, x, x, x]
            else:
                acc[0] += 1
                if x < acc[1]:
                    acc[1] = x
                if x > acc[2]:
                    acc[2] = x
                acc[3] += x

    def _window_for(self, ts: float, create: bool = False) -> dict[str, Any] | None:
        start = self._window_start(ts)
        for window in reversed(self._windows):
            if window["start"] == start:
                return window
            if window["start"] < start:
                break
        if not create or (self._windows and start < self._windows[-1]["start"]):
            return None  # older than the newest window: a late step; the window is closed
        window = {"start": start, "count": 0, "alerts": 0, "nonfinite": 0, "metrics": {}}
        self._windows.append(window)
        if len(self._windows) > self.keep_windows:
            del self._windows[0]
        return window

    @property
    def windows(self) -> list[dict[str, Any]]:
        """Closed and open windows, oldest first, with ``count/min/max/mean`` per metric."""
        return [{"start": w["start"], "end": w["start"] + self.window_s, "count": w["count"],
                 "alerts": w["alerts"], "nonfinite": w["nonfinite"],
                 "metrics": {name: {"count": n, "min": lo, "max": hi, "mean": total / n}
                             for name, (n, lo, hi, total) in w["metrics"].items()}}
                for w in self._windows]

    # -- state -------------------------------------------------------------------------------------------
    _FIELDS = ("run_id", "window_s", "keep_windows", "source", "tags", "first_ts", "last_ts", "last_step",
               "events", "duplicates", "out_of_order", "resumes", "alerts", "recent_steps", "seen_at")

    def to_dict(self) -> dict[str, Any]:
        return {**{name: getattr(self, name) for name in self._FIELDS}, "windows": self._windows,
                "history": self.history.to_dict()}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> RunSummary:
        summary = cls(state["run_id"], state.get("window_s", 60.0), state.get("keep_windows", 10))
        for name in cls._FIELDS:
            if name in state:
                setattr(summary, name, state[name])
        summary._windows = state.get("windows", [])
        summary.history = History.from_dict(state.get("history"))
        return summary

    def overview(self) -> dict[str, Any]:
        """The one-line view ``lossguard runs`` and ``/lossguard/runs/`` show."""
        return {"run_id": self.run_id, "source": self.source, "tags": self.tags, "last_step": self.last_step,
                "last_ts": self.last_ts, "events": self.events, "duplicates": self.duplicates,
                "out_of_order": self.out_of_order, "resumes": self.resumes, "alerts": dict(self.alerts)}
