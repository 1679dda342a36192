"""Small online statistics shared by the detectors: robust centre/scale, EMAs and bounded windows.

Everything here works on plain floats and lists so a detector's state stays JSON-able. Values kept in
windows are rounded to 7 significant digits: the per-run state stays small (the stream app stores it in
a changelog table), and because rounding happens *before* a value is used, a restored detector computes
exactly what the live one did.

>>> robust_center_scale([1.0, 1.1, 0.9, 1.0, 5.0])
(1.0, 0.14826)
>>> ema(None, 3.0, 0.5), ema(2.0, 4.0, 0.5)
(3.0, 3.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["compact", "push", "robust_center_scale", "ema", "ema_var"]


def compact(x: float) -> float:
    """``x`` rounded to 7 significant digits (what windows store)."""
    if x == 0 or not math.isfinite(x):
        return float(x)
    return float(f"{x:.7g}")


def push(window: list[float], x: float, size: int) -> None:
    """Append ``x`` (compacted) to ``window`` and keep only the last ``size`` values."""
    window.append(compact(x))
    if len(window) > size:
        del window[: len(window) - size]


def robust_center_scale(values: Sequence[float]) -> tuple[float, float]:
    """Median and 1.4826·MAD (a σ estimate that a few outliers cannot inflate)."""
    arr = np.asarray(values, dtype=float)
    median = float(np.median(arr))
    return median, round(1.4826 * float(np.median(np.abs(arr - median))), 12)


def ema(previous: float | None, x: float, alpha: float) -> float:
    """Exponential moving average; the first value starts it."""
    return compact(x if previous is None else previous + alpha * (x - previous))


def ema_var(mean: float, var: float, x: float, alpha: float) -> tuple[float, float]:
    """One step of an exponentially weighted mean and variance (West 1979 incremental form)."""
    diff = x - mean
    incr = alpha * diff
    return compact(mean + incr), compact((1 - alpha) * (var + diff * incr))
