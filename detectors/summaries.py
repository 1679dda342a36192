"""Arrays reported as summary statistics — one definition for the reporter (``reporter.log(rewards=...,
predictions=..., labels=...)``) and the in-process API (``analyze_training_step(rewards=..., predictions=...)``),
so the same argument gives the same metric names wherever it is summarised.

``<prefix>_mean`` and ``_std`` over all values (a NaN in gives NaN out: a signal), ``_min``, ``_max`` and
the quantiles ``_p05 _p25 _p50 _p75 _p95`` over the finite ones. Predictions (probabilities) add a
10-bin histogram ``calibration_bin0…9`` (fractions) and, with 0/1 labels of the same length, ``brier``
and ``ece`` (count-weighted gap between each bin's mean confidence and its observed frequency).

>>> m = distribution("reward", [0.0, 0.25, 0.5, 0.75, 1.0])
>>> sorted(m)
['reward_max', 'reward_mean', 'reward_min', 'reward_p05', 'reward_p25', 'reward_p50', 'reward_p75', 'reward_p95', 'reward_std']
>>> m["reward_p95"], m["reward_mean"]
(0.95, 0.5)
>>> p = prediction_metrics([0.9, 0.8, 0.95, 0.2, 0.1], [1, 1, 0, 0, 0])  # bin 9: |.925 - .5| · 2/5, ...
>>> round(p["ece"], 3), round(p["brier"], 4), p["calibration_bin9"]
(0.27, 0.2005, 0.4)
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["QUANTILES", "BINS", "distribution", "prediction_metrics"]

#: the quantiles every summary carries, named ``p05`` … ``p95``
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
#: calibration histogram bins over [0, 1]
BINS = 10


def distribution(prefix: str, values: Any) -> dict[str, float]:
    """Mean, std, min, max and :data:`QUANTILES` of ``values`` (array-like) as ``<prefix>_...`` metrics."""
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0:
        return {}
    out = {f"{prefix}_mean": float(x.mean()), f"{prefix}_std": float(x.std())}
    finite = x[np.isfinite(x)]
    if finite.size:
        out[f"{prefix}_min"], out[f"{prefix}_max"] = float(finite.min()), float(finite.max())
        for q, v in zip(QUANTILES, np.quantile(finite, QUANTILES), strict=True):
            out[f"{prefix}_p{round(q * 100):02d}"] = float(v)
    return out


def prediction_metrics(probabilities: Any, labels: Any = None) -> dict[str, float]:
    """:func:`distribution` of predicted probabilities, their calibration histogram and, with 0/1
    ``labels`` of the same length, ``brier`` and ``ece``."""
    x = np.asarray(probabilities, dtype=float).ravel()
    out = distribution("prediction", x)
    if not out:
        return out
    finite = x[np.isfinite(x)]
    bins = np.minimum((np.clip(finite, 0.0, 1.0) * BINS).astype(int), BINS - 1)
    counts = np.bincount(bins, minlength=BINS) / max(1, finite.size)
    out.update({f"calibration_bin{i}": float(c) for i, c in enumerate(counts)})
    if labels is not None:
        y = np.asarray(labels, dtype=float).ravel()
        if y.size == x.size:
            out["brier"] = float(np.mean((x - y) ** 2))
            all_bins = np.minimum((np.clip(x, 0, 1) * BINS).astype(int), BINS - 1)
            ece = 0.0
            for b in range(BINS):
                mask = all_bins == b
                if mask.any():
                    ece += mask.mean() * abs(x[mask].mean() - y[mask].mean())
            out["ece"] = float(ece)
    return out
