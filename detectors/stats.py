"""Small online statistics shared by the detectors: robust centre/scale, EMAs and bounded windows.

Everything here works on plain floats and lists so a detector's state stays JSON-able, and in pure
Python: numpy's per-call overhead is larger than the work on a 50-value window. ``median`` is the
same number ``np.median`` gives (an order statistic, or the mean of the middle two). Values kept in
windows are rounded to 7 significant digits: the per-run state stays small (the stream app stores it in
a changelog table), and because rounding happens *before* a value is used, a restored detector computes
exactly what the live one did. Single numbers (EMAs) are kept whole: JSON gives a float back bit for
bit, and rounding them would cost more than the rest of a step.

>>> robust_center_scale([1.0, 1.1, 0.9, 1.0, 5.0])
(1.0, 0.14826)
>>> median([3.0, 1.0, 2.0, 10.0]), lower_median_bound([1.0, 5.0, 2.0], [0.5, 9.0], 3)
(2.5, 1.0)
>>> ema(None, 3.0, 0.5), ema(2.0, 4.0, 0.5)
(3.0, 3.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["compact", "push", "median", "sorted_median", "lower_median_bound", "upper_median_bound", "robust_center_scale", "ema",
           "ema_var"]


_COMPACTED: dict[float, float] = {}


def compact(x: float) -> float:
    """``x`` rounded to 7 significant digits (what windows store).

    Memoized: a step's loss goes into several detectors' windows, and the rounding (a format and a
    parse) costs ten dictionary lookups.
    """
    r = _COMPACTED.get(x)
    if r is None:
        if x == 0 or not math.isfinite(x):
            return float(x)
        if len(_COMPACTED) >= 4096:
            _COMPACTED.clear()
        r = _COMPACTED[x] = float(f"{x:.7g}")
    return r


def push(window: list[float], x: float, size: int) -> None:
    """Append ``x`` (compacted) to ``window`` and keep only the last ``size`` values."""
    window.append(compact(x))
    if len(window) > size:
        del window[: len(window) - size]


def median(values: Sequence[float]) -> float:
    """The median of finite ``values`` (not empty)."""
    return sorted_median(sorted(values))


def sorted_median(ordered: Sequence[float]) -> float:
    """The median of ``ordered``, already sorted (not empty)."""
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def lower_median_bound(window: Sequence[float], new: Sequence[float], size: int) -> float:
    """A value no median of a window can be below while ``new`` values are pushed into ``window``.

    Each window on the way is ``size`` (or, before it fills, fewer but at least ``len(window)``)
    consecutive values of ``window + new``; a median of n values is at least their ``(n-1)//2``-th
    smallest, and a subset's k-th smallest is at least the whole set's. The batch screens use it to
    prove that no value of a batch can cross a median-based limit. ``window`` must not be empty.
    """
    n = min(size, len(window))
    return sorted([*window, *new])[(n - 1) // 2]


def upper_median_bound(values: Sequence[float], size: int) -> float:
    """A value no median of ``size`` consecutive ``values`` can be above (``len(values) >= size``).

    A median of ``size`` values is at most their ``size//2``-th smallest, and a subset's j-th smallest is
    at most the whole set's ``(j + len(values) - size)``-th.

    >>> upper_median_bound([1.0, 9.0, 2.0, 3.0], 3)
    3.0
    """
    return sorted(values)[len(values) - size + size // 2]


def robust_center_scale(values: Sequence[float]) -> tuple[float, float]:
    """Median and 1.4826·MAD (a σ estimate that a few outliers cannot inflate)."""
    center = median(values)
    return center, round(1.4826 * median([abs(x - center) for x in values]), 12)


def ema(previous: float | None, x: float, alpha: float) -> float:
    """Exponential moving average; the first value starts it."""
    return float(x) if previous is None else previous + alpha * (x - previous)


def ema_var(mean: float, var: float, x: float, alpha: float) -> tuple[float, float]:
    """One step of an exponentially weighted mean and variance (West 1979 incremental form)."""
    diff = x - mean
    incr = alpha * diff
    return mean + incr, (1 - alpha) * (var + diff * incr)
