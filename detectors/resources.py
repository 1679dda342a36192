"""Resource and liveness detectors: step-time outliers, memory growth, and runs that stopped reporting."""

from __future__ import annotations

import math
import operator

from .alerts import Alert, severity_rank
from .base import Detector, all_finite, column, compacted, may_have, register_detector
from .events import MetricEvent
from .stats import compact, ema, lower_median_bound, median, push, robust_center_scale

__all__ = ["StepTimeDetector", "MemoryGrowthDetector", "StalledRunDetector", "MEMORY_METRICS"]

#: memory metrics watched for growth (``rss`` comes from the torch producer, the others from CUDA)
MEMORY_METRICS = ("mem_allocated", "mem_reserved", "rss")

RESOURCES_DEFAULTS = {
    "window": 50,
    "warmup": 10,
    "step_time_threshold": 6.0,
    "step_time_ratio": 2.0,
    "step_time_max_severity": "medium",
    "memory_growth_threshold": 0.5,
    "memory_window": 50,
    "resolve_after": 20,
}


@register_detector
class StepTimeDetector(Detector):
    """``step_time`` far above the median of the last ``window`` ordinary steps (robust σ from the MAD).

    A step is slow when it is over ``step_time_threshold`` robust σ *and* ``step_time_ratio``× above the
    median. One slow step is ``low`` (a checkpoint save, a GC pause); ``medium`` after 5 in a row; ``high``
    after 20 in a row at 3× (data-loader starvation, throttling, a straggling rank) — but only where
    ``step_time_max_severity`` allows it: by default a slowdown is a resource problem (a contended host,
    a bigger batch), not a broken run, and stays at ``medium``.

    >>> from detectors.events import MetricEvent
    >>> times = [0.21, 0.2, 0.22, 0.2, 0.19, 0.21] * 10 + [4.0] + [0.2] * 10 + [0.9] * 25
    >>> d = StepTimeDetector()
    >>> [(a.severity, a.step, a.status) for s, t in enumerate(times) for a in d.update(MetricEvent("r", s, {"step_time": t}))]
    [('low', 60, 'firing'), ('medium', 75, 'firing')]
    >>> d = StepTimeDetector(step_time_max_severity="high")
    >>> [(a.severity, a.step, a.status) for s, t in enumerate(times) for a in d.update(MetricEvent("r", s, {"step_time": t}))]
    [('low', 60, 'firing'), ('medium', 75, 'firing'), ('high', 90, 'firing')]
    """

    name = "step_time"
    category = "resources"
    section = "resources"
    defaults = RESOURCES_DEFAULTS
    state_fields = ("recent", "run_length")
    metrics = ("step_time",)

    def reset(self) -> None:
        self.recent: list[float] = []
        self.run_length = 0

    def update(self, event: MetricEvent) -> list[Alert]:
        x = event.metrics.get("step_time")
        if x is None or not math.isfinite(x) or x < 0:
            return []
        if len(self.recent) < self.warmup:
            push(self.recent, x, self.window)
            return []
        median, sigma = robust_center_scale(self.recent)
        limit = median + max(self.step_time_threshold * sigma, (self.step_time_ratio - 1) * median)
        if x <= limit:
            self.run_length = 0
            push(self.recent, x, self.window)
            return self._report(event, "step_time_anomaly", False)
        self.run_length += 1
        ratio = x / median if median > 0 else math.inf
        severity = ("high" if self.run_length >= 20 and ratio >= 3 else
                    "medium" if self.run_length >= 5 else "low")
        if severity_rank(severity) > severity_rank(self.step_time_max_severity):
            severity = self.step_time_max_severity
        return self._report(event, "step_time_anomaly", True, severity=severity, value=x, threshold=limit,
                            message=f"step time {x:.3g}s is {ratio:.1f}x the recent median {median:.3g}s "
                                    f"for {self.run_length} step(s)",
                            metadata={"median": median, "ratio": ratio, "consecutive": self.run_length})

    def update_batch(self, events: list[MetricEvent]) -> list[tuple[int, Alert]]:
        # the limit is at least step_time_ratio x the median: a batch below that times the lowest median
        # it can meet has no slow step, and every step joins the window
        xs = column(events, "step_time")
        if (len(self.recent) < self.warmup or self.step_time_ratio < 1 or "step_time_anomaly" in self.episodes
                or not all_finite(xs) or min(xs) < 0):
            return super().update_batch(events)
        floor = lower_median_bound(self.recent, compacted(events, "step_time"), self.window)
        if max(xs) > floor + (self.step_time_ratio - 1) * floor:
            return super().update_batch(events)
        self.run_length = 0
        self.recent = [*self.recent, *compacted(events, "step_time")][-self.window:]
        return []


@register_detector
class MemoryGrowthDetector(Detector):
    """Memory (``mem_allocated``, ``mem_reserved``, ``rss``) growing past its early level and still rising.

    After ``warmup`` observations (allocators and caches fill up first), the mean of the next ``warmup``
    observations is the reference. An EMA of each metric is compared with it, and with its own value at
    the last two ``memory_window`` marks: growth over ``memory_growth_threshold`` is ``medium`` (a plateau
    after growth is fine and resolves); growth over twice the threshold that is *still rising*, by > 5 %
    in each of the last two windows, is ``high`` (sustained and large: a leak that will end in an
    out-of-memory), at 4× the threshold ``critical``.

    >>> from detectors.events import MetricEvent
    >>> d = MemoryGrowthDetector()
    >>> flat = [a for s in range(300) for a in d.update(MetricEvent("r", s, {"rss": 2e9 + 1e6 * (s % 5)}))]
    >>> flat
    []
    >>> leak = [a for s in range(300, 900) for a in d.update(MetricEvent("r", s, {"rss": 2e9 + 1e7 * (s - 300)}))]
    >>> [(a.severity, a.step) for a in leak]
    [('medium', 410), ('high', 510), ('critical', 710)]
    """

    name = "memory_growth"
    category = "resources"
    section = "resources"
    defaults = RESOURCES_DEFAULTS
    state_fields = ("tracks",)
    metrics = MEMORY_METRICS

    def reset(self) -> None:
        #: metric → {"n", "ref", "ema", "mark", "prev_mark"}
        self.tracks: dict[str, dict[str, float | None]] = {}

    def update(self, event: MetricEvent) -> list[Alert]:
        worst: tuple[float, str, bool] | None = None
        for name in MEMORY_METRICS:
            x = event.metrics.get(name)
            if x is None or not math.isfinite(x) or x <= 0:
                continue
            t = self.tracks.setdefault(name, _new_track())
            growth = self._step(t, x)
            if growth is None:
                continue
            # rising in each of the last two windows: a trend, not a one-off allocation
            marks = [t["ref"] if m is None else m for m in (t["prev_mark"], t["mark"])]
            rising = t["ema"] > marks[1] * 1.05 and marks[1] > marks[0] * 1.05
            if worst is None or growth > worst[0]:
                worst = (growth, name, rising)
        if worst is None:
            return []
        growth, name, rising = worst
        active = growth > self.memory_growth_threshold
        severity = ("critical" if rising and growth > 4 * self.memory_growth_threshold else
                    "high" if rising and growth > 2 * self.memory_growth_threshold else "medium")
        ref = self.tracks[name]["ref"]
        return self._report(event, "memory_growth", active, severity=severity, value=self.tracks[name]["ema"],
                            threshold=ref * (1 + self.memory_growth_threshold),
                            message=f"{name} grew {growth:.0%} over its early level {ref / 2**20:.0f} MiB"
                                    f"{' and is still rising' if rising else ''}",
                            metadata={"metric": name, "growth": growth, "rising": rising})

    def _step(self, t: dict[str, float | None], x: float) -> float | None:
        """Move one metric's track ``t`` by a valid value ``x``; its growth over the early level, or None
        while the track is still warming up or fixing that level."""
        t["n"] += 1
        t["ema"] = ema(t["ema"], x, 0.1)
        n = t["n"] - self.warmup
        if n <= 0:
            return None
        if n <= self.warmup:
            t["ref"] = compact(x if t["ref"] is None else t["ref"] + (x - t["ref"]) / n)
            return None
        if (n - self.warmup) % self.memory_window == 0:
            t["prev_mark"], t["mark"] = t["mark"], t["ema"]
        return t["ema"] / t["ref"] - 1

    def update_batch(self, events: list[MetricEvent]) -> list[tuple[int, Alert]]:
        # the same track steps on copies of the tracks, one metric at a time (an alert needs some metric's
        # growth over the threshold at some step, so the metrics need not be walked together); such a
        # step sends the whole batch (state untouched) to the step-by-step path
        if "memory_growth" in self.episodes:
            return super().update_batch(events)
        tracks = {name: dict(t) for name, t in self.tracks.items()}
        for name in MEMORY_METRICS:
            if not may_have(events, name):
                continue
            t = tracks.get(name)
            xs = column(events, name)
            if t is not None and self._steady(t, xs):
                continue
            for x in xs:
                if x is None or not math.isfinite(x) or x <= 0:
                    continue
                if t is None:
                    t = tracks[name] = _new_track()
                growth = self._step(t, x)
                if growth is not None and growth > self.memory_growth_threshold:
                    return super().update_batch(events)
        self.tracks = tracks
        return []

    def _steady(self, t: dict[str, float | None], xs: list[float | None]) -> bool:
        """Move track ``t`` over ``xs`` at once when every value equals its EMA past the warm-up (memory
        that holds still: the EMA stays put and the growth is constant) and that growth cannot fire."""
        ema_now, ref, n = t["ema"], t["ref"], t["n"]
        if (ema_now is None or ref is None or not ema_now > 0 or n < 2 * self.warmup or xs.count(ema_now) != len(xs)
                or ema_now / ref - 1 > self.memory_growth_threshold):
            return False
        # the marks move at each multiple of memory_window after the warm-up: to the (unchanged) EMA
        before, after = n - 2 * self.warmup, n + len(xs) - 2 * self.warmup
        moves = after // self.memory_window - before // self.memory_window
        if moves >= 1:
            t["prev_mark"], t["mark"] = (t["mark"] if moves == 1 else ema_now), ema_now
        t["n"] = n + len(xs)
        return True


def _new_track() -> dict[str, float | None]:
    return {"n": 0, "ref": None, "ema": None, "mark": None, "prev_mark": None}


@register_detector
class StalledRunDetector(Detector):
    """No event for ``stall_factor``× the run's usual interval between events (and at least ``min_seconds``).

    Works two ways: ``tick(now)``, called periodically by the stream app with the wall clock, sees a run
    that is silent right now: ``medium``; ``high`` once the silence also exceeds ``stall_seconds`` (a
    checkpoint save of a big model can take minutes); ``critical`` past 6× that. ``update`` sees a gap
    only when the next event has arrived — the run is moving again (offline replay has no "now" at all)
    — so a past gap is ``medium`` at most. An event tagged ``status`` = ``finished``, ``completed``,
    ``stopped`` or ``failed`` ends the watch: a run that ended is not stalled.

    >>> from detectors.events import MetricEvent
    >>> d = StalledRunDetector()
    >>> [a for s in range(50) for a in d.update(MetricEvent("r", s, {"loss": 1.0}, ts=1000.0 + 2 * s))]
    []
    >>> [(a.severity, a.step) for a in d.tick(now=1098.0 + 900)]
    [('high', 49)]
    >>> [(a.status, a.step) for s in (50, 51) for a in d.update(MetricEvent("r", s, {"loss": 1.0}, ts=2000.0 + s))]
    [('resolved', 51)]
    """

    name = "stalled_run"
    category = "liveness"
    section = "liveness"
    defaults = {"stall_factor": 10.0, "min_seconds": 60.0, "stall_seconds": 600.0, "resolve_after": 1}
    state_fields = ("run_id", "last_step", "last_ts", "intervals", "finished")

    FINISHED = ("finished", "completed", "stopped", "failed")

    def reset(self) -> None:
        self.run_id: str | None = None
        self.last_step: int | None = None
        self.last_ts: float | None = None
        self.intervals: list[float] = []
        self.finished = False

    def _judge(self, gap: float) -> str | None:
        """The severity of a silence of ``gap`` seconds, or None when it is not a stall."""
        typical = median(self.intervals) if len(self.intervals) >= 5 else None
        if typical is None or gap <= max(self.min_seconds, self.stall_factor * typical):
            return None
        if gap > 6 * self.stall_seconds:
            return "critical"
        return "high" if gap > self.stall_seconds else "medium"

    def _stall(self, event: MetricEvent, gap: float, severity: str | None) -> list[Alert]:
        return self._report(event, "stalled_run", severity is not None, severity=severity or "medium",
                            value=gap, threshold=self.stall_seconds,
                            message=f"no metrics for {gap:.0f}s after step {self.last_step} "
                                    f"(usually every {median(self.intervals or [0]):.3g}s)",
                            metadata={"last_step": self.last_step, "last_ts": self.last_ts})

    def update(self, event: MetricEvent) -> list[Alert]:
        self.run_id = event.run_id
        alerts: list[Alert] = []
        if self.last_ts is not None and event.ts >= self.last_ts:
            gap = event.ts - self.last_ts
            severity = self._judge(gap)
            if severity is None and gap > 0:
                push(self.intervals, gap, 20)
            elif severity is not None:
                severity = "medium"  # the run reported again: a gap in the past, not a stall now
            alerts = self._stall(event, gap, severity)
        self.last_step, self.last_ts = event.step, event.ts
        # the last word counts: a run that reports again after "finished" was resumed
        self.finished = str(event.tags.get("status", "")).lower() in self.FINISHED
        return alerts

    def update_batch(self, events: list[MetricEvent]) -> list[tuple[int, Alert]]:
        # a gap of at most min_seconds is never a stall: with no episode open, such a batch only
        # records its intervals
        times = [e.ts for e in events]
        if self.last_ts is not None:
            times.insert(0, self.last_ts)
        if sorted(times) == times:  # times never go back: every gap counts, in C
            gaps = list(map(operator.sub, times[1:], times[:-1]))
        else:
            last, gaps = self.last_ts, []
            for ts in times[self.last_ts is not None:]:
                if last is not None and ts >= last:
                    gaps.append(ts - last)
                last = ts
        if "stalled_run" in self.episodes or (gaps and max(gaps) > self.min_seconds):
            return super().update_batch(events)
        if gaps and min(gaps) > 0:  # only the last 20 are kept
            self.intervals = [*self.intervals, *map(compact, gaps[-20:])][-20:]
        else:
            for gap in gaps:
                if gap > 0:
                    push(self.intervals, gap, 20)
        event = events[-1]
        self.run_id, self.last_step, self.last_ts = event.run_id, event.step, event.ts
        self.finished = str(event.tags.get("status", "")).lower() in self.FINISHED
        return []

    def tick(self, now: float) -> list[Alert]:
        if self.finished or self.last_ts is None or self.run_id is None:
            return []
        gap = now - self.last_ts
        severity = self._judge(gap)
        if severity is None:
            return []  # silence shorter than a stall is no evidence of recovery either
        probe = MetricEvent(run_id=self.run_id, step=self.last_step or 0, metrics={}, ts=now)
        return self._stall(probe, gap, severity)
