"""Per-run aggregates the CLI, dashboard and reports read: step order, counts, tumbling windows.

:class:`RunSummary` answers, for one run: is this event new, a re-delivery, a late step, or the first
step of a resumed run? — and keeps tumbling windows of ``window_s`` seconds (event time) with, per
metric, count/min/max/mean, plus the alerts raised in the window. The stream app keeps one per run in
the changelog-backed ``run_summary`` table, so they survive restarts and rebalances like detector state.

Step order (new / resumed / same_step / duplicate / out_of_order), the run's position, source, tags
and counts come from :class:`detectors.driver.RunLedger`, which every way of running the detectors
shares through :class:`~detectors.RunDriver`; this class adds the windows and the charts' history.

>>> from detectors import MetricEvent
>>> s = RunSummary("r")
>>> kinds = [s.observe(MetricEvent("r", step, {"loss": x}, ts=ts)) for step, x, ts in
...          [(1, 2.0, 10.0), (2, 1.5, 11.0), (2, 1.5, 11.0), (3, 1.0, 12.0)]]
>>> kinds, s.windows[-1]["metrics"]["loss"]  # the re-delivered step is aggregated once
(['new', 'new', 'duplicate', 'new'], {'count': 3, 'min': 1.0, 'max': 2.0, 'mean': 1.5})
"""

from __future__ import annotations

import math
from bisect import bisect_left
from typing import Any

from detectors import Alert, MetricEvent
from detectors.driver import RunLedger

from .history import History

__all__ = ["RunSummary"]


class RunSummary(RunLedger):
    """Counts, step order and tumbling-window aggregates of one run (serializable)."""

    _FIELDS = (*RunLedger._FIELDS, "window_s", "keep_windows", "seen_at")

    def __init__(self, run_id: str, window_s: float = 60.0, keep_windows: int = 10):
        super().__init__(run_id)
        self.window_s = window_s
        self.keep_windows = keep_windows
        #: the worker's clock (unix seconds) when it last saved a record of the run: how long a run has been
        #: silent is measured on this clock, not against the producer's timestamps (a replay, a skewed clock)
        self.seen_at: float | None = None
        #: oldest first: {"start", "count", "alerts", "metrics": {name: [n, min, max, sum]}, "nonfinite"}
        self._windows: list[dict[str, Any]] = []
        #: the charts' bounded, downsampled series (stream_app.history)
        self.history = History()

    def _accept(self, events: list[MetricEvent]) -> None:
        """The ledger's bookkeeping, then the charts' history and the windows, for accepted ``events``."""
        super()._accept(events)
        first = events[0]
        history = self.history
        if len(events) == 1:
            history.add(first.step, first.metrics)
            window = self._open_window(first.ts)
            if window is not None:
                window["count"] += 1
                self._aggregate(window, window["metrics"], first.metrics)
            return
        steps = [e.step for e in events]
        # every charted metric of the record, also those logged at some steps only (a validation loss)
        for name in history.metrics.intersection(set().union(*[e.metrics.keys() for e in events])):
            column = [e.metrics.get(name) for e in events]
            if None in column:  # not logged at every step of the record
                pairs = [(s, v) for s, v in zip(steps, column, strict=True) if v is not None]
                history.add_column(name, [s for s, _ in pairs], [v for _, v in pairs])
            else:
                history.add_column(name, steps, column)
        window_start = self._window_start
        if window_start(first.ts) == window_start(events[-1].ts):  # times only go forward: one window
            self._add_to_window(events)
            return
        times = [e.ts for e in events]
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
        super().count_alert(alert)
        window = self._window_for(alert.ts)
        if window is not None:
            window["alerts"] += 1

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
    def to_dict(self) -> dict[str, Any]:
        return {**{name: getattr(self, name) for name in self._FIELDS}, "windows": self._windows,
                "history": self.history.to_dict()}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> RunSummary:
        summary = cls(state["run_id"], state.get("window_s", 60.0), state.get("keep_windows", 10))
        summary.load_dict(state)
        summary._windows = state.get("windows", [])
        summary.history = History.from_dict(state.get("history"))
        return summary

    def overview(self) -> dict[str, Any]:
        """The one-line view ``lossguard runs`` and ``/lossguard/runs/`` show."""
        return {"run_id": self.run_id, "source": self.source, "tags": self.tags, "last_step": self.last_step,
                "last_ts": self.last_ts, "events": self.events, "duplicates": self.duplicates,
                "out_of_order": self.out_of_order, "resumes": self.resumes, "alerts": dict(self.alerts)}
