"""A run's chart history: a bounded, downsampled ``(step, value)`` series per charted metric.

Min/max bucketing (the idea of M4, Jugel et al., VLDB 2014): steps fall into buckets of ``stride``
steps and each bucket keeps its lowest and its highest point, so a one-step spike survives any amount
of downsampling — what a chart of a sick run must show. When a series passes ``max_points`` the stride
doubles and neighbouring buckets merge, so the cost per step stays constant and the size bounded
(at most ``max_points`` points per metric, whatever the run's length). Non-finite values are not
points; their latest steps are kept apart (the alert that a NaN raises marks them on the chart too).

The state is plain JSON and lives inside the run's ``run_summary`` value, so it survives restarts and
partition takeovers with the rest of the run. :meth:`History.to_json` gives that JSON without encoding again
the points that did not change since the run's last save: only the last bucket of a series moves.

>>> h = History(max_points=8)
>>> for step in range(100):
...     h.add(step, {"loss": 50.0 if step == 37 else 1.0})
>>> h.stride, len(h.series["loss"]) <= 8, (37, 50.0) in h.series["loss"]
(16, True, True)
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

__all__ = ["CHART_METRICS", "History"]

#: the metrics a run's charts draw (others stay in the windows' aggregates)
CHART_METRICS = ("loss", "val_loss", "grad_norm", "lr", "reward_mean", "kl", "entropy", "response_length")

_NONFINITE_KEPT = 20


class History:
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
        #: name → (series, stride, count, series[count - 1], JSON of series[:count] without brackets): the
        #: encoding of the settled points — those before the last point's bucket: steps only come after the
        #: last, so only the last bucket changes — valid while the series is the same list at the same stride
        #: (coarsening builds new lists)
        self._encoded: dict[str, tuple[list[tuple[int, float]], int, int, tuple[int, float], bytes]] = {}

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
            steps, values = steps[begin:], values[begin:]
        if math.isfinite(sum(map(abs, values))):
            # the usual case, checked in C: no NaN or infinity, and no sum of them overflows
            self._add_finite(series, steps, values)
        else:
            self._add_any(name, series, steps, values)
        if len(series) > self.max_points:
            self._coarsen()

    def _add_finite(self, series: list[tuple[int, float]], steps: Sequence[int], values: Sequence[float]) -> None:
        """Each bucket's lowest and highest value (the earliest step of each) by ``min``/``max`` in C, its
        bucket's end found by bisection."""
        stride = self.stride
        end_bucket = steps[-1] // stride if steps else 0
        begin, count = 0, len(steps)
        while begin < count:
            bucket = steps[begin] // stride
            end = count if bucket == end_bucket else bisect_left(steps, (bucket + 1) * stride, begin + 1)
            if end - begin == 1:
                low = high = (steps[begin], values[begin])
            else:
                part = values[begin:end]
                low_value, high_value = min(part), max(part)
                low = (steps[values.index(low_value, begin, end)], low_value)
                high = low if high_value == low_value else (steps[values.index(high_value, begin, end)], high_value)
            if begin == 0 and series and series[-1][0] // stride == bucket:
                # the points already in this bucket (one or two, at the end) compete with the new ones
                points = [low, high]
                while series and series[-1][0] // stride == bucket:
                    points.append(series.pop())
                series.extend(_extremes(points))
            elif low is high:
                series.append(low)
            elif low[0] < high[0]:
                series += (low, high)
            else:
                series += (high, low)
            begin = end

    def _add_any(self, name: str, series: list[tuple[int, float]], steps: Sequence[int],
                 values: Sequence[float]) -> None:
        """Bucket by bucket, non-finite values set apart."""
        begin = 0
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
            stride = self.stride
            for name, series in self.series.items():
                self.series[name] = _merged(series, stride)

    def to_dict(self) -> dict[str, Any]:
        return {"max_points": self.max_points, "stride": self.stride, "series": self.series,
                "nonfinite": self.nonfinite}

    def to_json(self) -> bytes:
        """``orjson.dumps(self.to_dict())``, byte for byte, with each series' settled points (all but its
        last bucket's) encoded once: a run that sends single events is saved every few steps, and encoding
        its ~400 points again each time was most of what a save cost (115 of 150 µs a save, 200 runs)."""
        series = b",".join(orjson.dumps(name) + b":" + self._series_json(name, points)
                           for name, points in self.series.items())
        return (b'{"max_points":' + orjson.dumps(self.max_points) + b',"stride":' + orjson.dumps(self.stride)
                + b',"series":{' + series + b'},"nonfinite":' + orjson.dumps(self.nonfinite) + b"}")

    def _series_json(self, name: str, series: list[tuple[int, float]]) -> bytes:
        cached = self._encoded.get(name)
        count, settled = 0, b""
        if cached is not None and cached[0] is series and cached[1] == self.stride:
            # (and its last settled point still in place: a guard, should a change ever break the rule)
            if len(series) >= cached[2] and series[cached[2] - 1] is cached[3]:
                count, settled = cached[2], cached[4]
        end = len(series) - 1
        if end > count:  # settle the points before the last bucket's
            last_bucket = series[-1][0] // self.stride
            while end > count and series[end - 1][0] // self.stride == last_bucket:
                end -= 1
        if end > count:
            more = orjson.dumps(series[count:end])[1:-1]
            settled = settled + b"," + more if settled else more
            count = end
            self._encoded[name] = (series, self.stride, count, series[count - 1], settled)
        tail = orjson.dumps(series[count:])[1:-1]
        return b"[" + settled + (b"," if settled and tail else b"") + tail + b"]"

    @classmethod
    def from_dict(cls, state: Mapping[str, Any] | None) -> History:
        history = cls()
        if state:
            history.max_points = state.get("max_points", history.max_points)
            history.stride = state.get("stride", 1)
            history.series = {name: [tuple(point) for point in points]
                              for name, points in state.get("series", {}).items()}
            history.nonfinite = state.get("nonfinite", {})
        return history


def _merged(series: list[tuple[int, float]], stride: int) -> list[tuple[int, float]]:
    """``series`` (step order) with the points of each bucket of ``stride`` steps reduced to its extremes."""
    merged: list[tuple[int, float]] = []
    buckets = [step // stride for step, _ in series]
    begin, count = 0, len(series)
    while begin < count:
        bucket = buckets[begin]
        end = begin + 1
        while end < count and buckets[end] == bucket:
            end += 1
        if end - begin == 1:
            merged.append(series[begin])
        else:
            merged += _extremes(series[begin:end])
        begin = end
    return merged


def _extremes(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The lowest and the highest of ``points`` in step order (one point when they are the same); of equal
    values, the earliest step's."""
    low = high = points[0]
    for point in points[1:]:
        step, value = point
        if value < low[1] or value == low[1] and step < low[0]:
            low = point
        if value > high[1] or value == high[1] and step < high[0]:
            high = point
    if low is high or low == high:
        return [low]
    return [low, high] if low[0] < high[0] else [high, low]
