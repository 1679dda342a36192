"""The chart history as it was at 34eb593 (``stream_app/history.py``), before its bucketing was rewritten for
speed: the reference that ``tests/test_history.py`` holds the new code to, point for point. Kept verbatim
(only this docstring and the class's name differ); do not change it to follow the new code."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from stream_app.history import CHART_METRICS

_NONFINITE_KEPT = 20


class ReferenceHistory:
    """Per-metric ``[(step, value), ...]`` (step order), at most ``max_points`` each. A point is a tuple:
    a tuple of numbers drops out of the garbage collector's tracking after its first collection, a list
    never does — with ~1,000 points a run, 10,000 runs made every full collection of the worker traverse
    ten million lists (the state's JSON is the same: ``[[step, value], ...]``)."""

    def __init__(self, max_points: int = 240, metrics: Sequence[str] = CHART_METRICS):
        self.max_points = max_points
        self.metrics = frozenset(metrics)
        self.stride = 1
        self.series: dict[str, list[tuple[int, float]]] = {}
        self.nonfinite: dict[str, list[int]] = {}

    def add(self, step: int, metrics: Mapping[str, float]) -> None:
        """One step's values (the one-event path: no slicing, and a value inside its bucket's range costs
        two comparisons)."""
        stride = self.stride
        bucket = step // stride
        for name, value in metrics.items():
            if name not in self.metrics:
                continue
            series = self.series.get(name)
            if series is None:
                series = self.series[name] = []
            elif series and step <= series[-1][0]:  # (empty: only non-finite values so far)
                continue
            if not math.isfinite(value):
                self.add_column(name, (step,), (value,))  # the rare path keeps the bookkeeping
                continue
            last = series[-1] if series else None
            if last is None or last[0] // stride != bucket:
                series.append((step, value))
                if len(series) > self.max_points:
                    self._coarsen()
                    stride, bucket = self.stride, step // self.stride
            elif len(series) > 1 and series[-2][0] // stride == bucket:  # the bucket has its low and high
                low, high = (series[-2], last) if series[-2][1] <= last[1] else (last, series[-2])
                if value < low[1]:
                    low = (step, value)
                elif value > high[1]:
                    high = (step, value)
                else:
                    continue
                series[-2:] = [low, high] if low[0] < high[0] else [high, low]
            elif value != last[1]:
                series.append((step, value))  # a second point: the bucket's low and high

    def add_column(self, name: str, steps: Sequence[int], values: Sequence[float]) -> None:
        """Steps (ascending) and values of one metric; steps not past the series' last are skipped (a
        resumed run's replayed steps)."""
        series = self.series.setdefault(name, [])
        begin = 0
        if series and steps[0] <= series[-1][0]:
            while begin < len(steps) and steps[begin] <= series[-1][0]:
                begin += 1
        while begin < len(steps):
            bucket = steps[begin] // self.stride
            end = begin + 1
            if steps[-1] // self.stride == bucket:  # the whole rest is one bucket: C-level min/max
                end = len(steps)
            else:
                while end < len(steps) and steps[end] // self.stride == bucket:
                    end += 1
            self._into_bucket(name, series, bucket, steps[begin:end], values[begin:end])
            begin = end
        if len(series) > self.max_points:
            self._coarsen()

    def _into_bucket(self, name: str, series: list[tuple[int, float]], bucket: int, steps: Sequence[int],
                     values: Sequence[float]) -> None:
        if math.isfinite(sum(values)):  # the usual case, in C: no NaN or infinity among them
            low, high = min(values), max(values)
            finite = [(low, steps[values.index(low)]), (high, steps[values.index(high)])]
        else:
            finite = [(v, s) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
            bad = self.nonfinite.setdefault(name, [])
            bad.extend(s for s, v in zip(steps, values, strict=True) if not math.isfinite(v))
            del bad[:-_NONFINITE_KEPT]
        if not finite:
            return
        points = [(s, v) for v, s in (min(finite), max(finite))]
        # the points already in this bucket (one or two, at the end) compete with the new ones
        while series and series[-1][0] // self.stride == bucket:
            points.append(series.pop())
        series.extend(_extremes(points))

    def _coarsen(self) -> None:
        while any(len(s) > self.max_points for s in self.series.values()):
            self.stride *= 2
            for name, series in self.series.items():
                merged: list[tuple[int, float]] = []
                for point in series:
                    if merged and merged[-1][0] // self.stride == point[0] // self.stride:
                        group = [point]
                        while merged and merged[-1][0] // self.stride == point[0] // self.stride:
                            group.append(merged.pop())
                        merged.extend(_extremes(group))
                    else:
                        merged.append(point)
                self.series[name] = merged

    def to_dict(self) -> dict[str, Any]:
        return {"max_points": self.max_points, "stride": self.stride, "series": self.series,
                "nonfinite": self.nonfinite}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any] | None) -> ReferenceHistory:
        history = cls()
        if state:
            history.max_points = state.get("max_points", history.max_points)
            history.stride = state.get("stride", 1)
            history.series = {name: [tuple(point) for point in points]
                              for name, points in state.get("series", {}).items()}
            history.nonfinite = state.get("nonfinite", {})
        return history


def _extremes(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The lowest and the highest of ``points`` in step order (one point when they are the same)."""
    low = min(points, key=lambda p: (p[1], p[0]))
    high = max(points, key=lambda p: (p[1], -p[0]))
    return [low] if low is high or low == high else sorted([low, high])
