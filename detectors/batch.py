"""Batch-size detector: did a change of ``batch_size`` hurt the run?"""

from __future__ import annotations

import math

import numpy as np

from .alerts import Alert
from .base import Detector, register_detector
from .events import MetricEvent
from .stats import compact, push

__all__ = ["BatchSizeImpactDetector"]


@register_detector
class BatchSizeImpactDetector(Detector):
    """Loss (and throughput) in the ``window_size`` steps after a batch-size change vs the steps before.

    When ``batch_size`` changes, the mean loss of the last ``window_size`` steps is compared with the mean
    of the ``window_size`` steps before the change, at every step of the three windows that follow. The change hurt when the loss is more than
    ``performance_threshold`` (relative) higher *and* the difference is over 3 standard errors (small-batch
    losses are noisy). ``medium``; ``high`` at 3× the threshold. A throughput drop of more than the
    threshold per sample is reported the same way (``medium``).

    >>> import random
    >>> from detectors.events import MetricEvent
    >>> rng = random.Random(0)
    >>> d = BatchSizeImpactDetector()
    >>> out = [a for s in range(100) for a in d.update(MetricEvent("r", s, {"loss": 0.9 + rng.gauss(0, 0.05), "batch_size": 64}))]
    >>> out += [a for s in range(100, 140) for a in d.update(MetricEvent("r", s, {"loss": 1.4 + rng.gauss(0, 0.2), "batch_size": 4}))]
    >>> [(a.alert_type, a.severity, a.step, a.status) for a in out]
    [('batch_size_impact', 'high', 119, 'firing')]
    """

    name = "batch_size_impact"
    category = "batch_size"
    section = "batch_size"
    defaults = {"performance_threshold": 0.1, "window_size": 20, "resolve_after": 20}
    state_fields = ("batch_size", "old_batch_size", "before", "after", "tp_before", "tp_after", "pending",
                    "since_change")

    def reset(self) -> None:
        self.batch_size: float | None = None
        self.old_batch_size: float | None = None
        self.before: list[float] = []
        self.after: list[float] = []
        self.tp_before: list[float] = []
        self.tp_after: list[float] = []
        self.pending = False
        self.since_change = 0

    def update(self, event: MetricEvent) -> list[Alert]:
        bs, loss, tp = (event.metrics.get(k) for k in ("batch_size", "loss", "throughput"))
        if bs is not None and math.isfinite(bs):
            if self.batch_size is not None and bs != self.batch_size and len(self.before) >= 3:
                self.old_batch_size, self.pending = self.batch_size, True
                self.after, self.tp_after, self.since_change = [], [], 0
            self.batch_size = compact(bs)
        window, series = (self.after, self.tp_after) if self.pending else (self.before, self.tp_before)
        if loss is not None and math.isfinite(loss):
            push(window, loss, self.window_size)
        if tp is not None and math.isfinite(tp) and tp > 0:
            push(series, tp, self.window_size)
        if not self.pending:
            return self._report(event, "batch_size_impact", False)
        self.since_change += 1
        if len(self.after) < self.window_size:
            return []
        # the last window_size steps after the change, judged for three windows: harm can take a while
        alerts = self._judge(event)
        if self.since_change >= 3 * self.window_size:
            self.pending = False
            self.before, self.tp_before = self.after, self.tp_after
            self.after, self.tp_after = [], []
        return alerts

    def _judge(self, event: MetricEvent) -> list[Alert]:
        b, a = np.asarray(self.before), np.asarray(self.after)
        worse = (a.mean() - b.mean()) / abs(b.mean()) if b.mean() else 0.0
        stderr = math.sqrt(b.var(ddof=1) / len(b) + a.var(ddof=1) / len(a)) if len(b) > 1 else 0.0
        loss_hurt = worse > self.performance_threshold and a.mean() - b.mean() > 3 * stderr
        tp_drop = 0.0
        if self.tp_before and self.tp_after and self.batch_size and self.old_batch_size:
            # throughput is compared per sample so a smaller batch that is simply smaller is not a drop
            tp_drop = 1 - np.mean(self.tp_after) / np.mean(self.tp_before)
        tp_hurt = tp_drop > self.performance_threshold
        if not (loss_hurt or tp_hurt):
            return self._report(event, "batch_size_impact", False)
        severity = "high" if loss_hurt and worse > 3 * self.performance_threshold else "medium"
        what = (f"loss {b.mean():.4g} → {a.mean():.4g} ({worse:+.0%})" if loss_hurt
                else f"throughput down {tp_drop:.0%}")
        return self._report(
            event, "batch_size_impact", True, severity=severity, value=float(worse if loss_hurt else tp_drop),
            threshold=self.performance_threshold,
            message=f"batch size {self.old_batch_size:g} → {self.batch_size:g}: {what} over {self.window_size} steps",
            metadata={"old_batch_size": self.old_batch_size, "new_batch_size": self.batch_size,
                      "loss_before": float(b.mean()), "loss_after": float(a.mean()),
                      "throughput_drop": float(tp_drop)})
