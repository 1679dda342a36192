"""Batch-size detector: a batch-size jump the learning rate was not adjusted for, and did a change hurt?"""

from __future__ import annotations

import math

import numpy as np

from .alerts import Alert
from .base import Detector, column, compacted, last_finite, may_have, register_detector
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

    ``batch_size_change`` does not wait for the damage: a jump of ``change_factor``× or more that holds
    for ``change_persist`` observations (an epoch's last partial batch does not) is ``high`` when the
    learning rate did not follow it. The gradient noise scales as 1/batch, so the usual rules move the
    LR by between sqrt and linear of the batch factor (Goyal et al. 2017, arXiv:1706.02677; Malladi et
    al. 2022, arXiv:2205.10287); an LR that moved by less than a fourth power of it (or the wrong way)
    did not follow. Without a logged ``lr`` it is ``medium``.

    >>> import random
    >>> from detectors.events import MetricEvent
    >>> rng = random.Random(0)
    >>> d = BatchSizeImpactDetector()
    >>> out = [a for s in range(100) for a in d.update(MetricEvent("r", s, {"loss": 0.9 + rng.gauss(0, 0.05), "batch_size": 64}))]
    >>> out += [a for s in range(100, 140) for a in d.update(MetricEvent("r", s, {"loss": 1.4 + rng.gauss(0, 0.2), "batch_size": 4}))]
    >>> [(a.alert_type, a.severity, a.step, a.status) for a in out]
    [('batch_size_change', 'medium', 102, 'firing'), ('batch_size_impact', 'high', 119, 'firing')]
    >>> d = BatchSizeImpactDetector()
    >>> bs = [64] * 100 + [4] * 5
    >>> [(a.alert_type, a.severity, a.step) for s, b in enumerate(bs) for a in d.update(MetricEvent("r", s, {"batch_size": b, "lr": 0.03}))]
    [('batch_size_change', 'high', 102)]
    >>> d = BatchSizeImpactDetector()   # LR scaled with the batch (linear rule): fine
    >>> [a for s, b in enumerate(bs) for a in d.update(MetricEvent("r", s, {"batch_size": b, "lr": 0.03 * b / 64}))]
    []
    """

    name = "batch_size_impact"
    category = "batch_size"
    section = "batch_size"
    defaults = {"performance_threshold": 0.1, "window_size": 20, "change_factor": 4.0, "change_persist": 3,
                "resolve_after": 20}
    state_fields = ("batch_size", "old_batch_size", "before", "after", "tp_before", "tp_after", "pending",
                    "since_change", "lr", "jump")

    def reset(self) -> None:
        self.batch_size: float | None = None
        self.old_batch_size: float | None = None
        self.before: list[float] = []
        self.after: list[float] = []
        self.tp_before: list[float] = []
        self.tp_after: list[float] = []
        self.pending = False
        self.since_change = 0
        self.lr: float | None = None
        #: a large batch-size jump being confirmed: {"from", "to", "lr_before", "seen"}
        self.jump: dict[str, float | None] | None = None

    def update(self, event: MetricEvent) -> list[Alert]:
        bs, loss, tp, lr = (event.metrics.get(k) for k in ("batch_size", "loss", "throughput", "lr"))
        alerts: list[Alert] = []
        if bs is not None and math.isfinite(bs) and bs > 0:
            if self.batch_size is not None and bs != self.batch_size:
                factor = max(bs, self.batch_size) / min(bs, self.batch_size)
                self.jump = ({"from": self.batch_size, "to": compact(bs), "lr_before": self.lr, "seen": 0}
                             if factor >= self.change_factor else None)
                if len(self.before) >= 3:
                    self.old_batch_size, self.pending = self.batch_size, True
                    self.after, self.tp_after, self.since_change = [], [], 0
            self.batch_size = compact(bs)
            if self.jump is not None:
                self.jump["seen"] += 1
            alerts += self._judge_jump(event, lr)
        if lr is not None and math.isfinite(lr):
            self.lr = compact(lr)
        window, series = (self.after, self.tp_after) if self.pending else (self.before, self.tp_before)
        if loss is not None and math.isfinite(loss):
            push(window, loss, self.window_size)
        if tp is not None and math.isfinite(tp) and tp > 0:
            push(series, tp, self.window_size)
        if not self.pending:
            return alerts + self._report(event, "batch_size_impact", False)
        self.since_change += 1
        if len(self.after) < self.window_size:
            return alerts
        # the last window_size steps after the change, judged for three windows: harm can take a while
        alerts += self._judge(event)
        if self.since_change >= 3 * self.window_size:
            self.pending = False
            self.before, self.tp_before = self.after, self.tp_after
            self.after, self.tp_after = [], []
        return alerts

    def update_batch(self, events: list[MetricEvent]) -> list[tuple[int, Alert]]:
        # a batch at the run's known batch size, with no change being judged, only fills the "before"
        # windows and follows the LR; a single event costs less through update (no window copied whole)
        if len(events) == 1 or self.pending or self.jump is not None or self.episodes:
            return super().update_batch(events)
        if may_have(events, "batch_size"):
            sizes = column(events, "batch_size")
            if sizes.count(self.batch_size) != len(sizes) and any(
                    bs is not None and math.isfinite(bs) and bs > 0 and bs != self.batch_size for bs in sizes):
                return super().update_batch(events)
        # only the last LR and the last window_size losses and rates are kept
        if may_have(events, "lr"):
            lrs = last_finite(column(events, "lr"), 1)
            if lrs:
                self.lr = compact(lrs[-1])
        if may_have(events, "loss"):
            losses = last_finite(compacted(events, "loss"), self.window_size)  # the loss detectors share it
            if losses:
                self.before = [*self.before, *losses][-self.window_size:]
        if may_have(events, "throughput"):
            rates = [compact(x) for x in last_finite(column(events, "throughput"), self.window_size, positive=True)]
            if rates:
                self.tp_before = [*self.tp_before, *rates][-self.window_size:]
        return []

    def _judge_jump(self, event: MetricEvent, lr: float | None) -> list[Alert]:
        jump = self.jump
        if jump is None or jump["seen"] < self.change_persist:
            return self._report(event, "batch_size_change", False)
        factor = jump["to"] / jump["from"]
        lr_now = lr if lr is not None and math.isfinite(lr) else self.lr
        before = jump["lr_before"]
        if lr_now is None or before is None or lr_now <= 0 or before <= 0:
            followed, severity, how = None, "medium", "no learning rate logged"
        else:
            # the exponent k in lr ∝ batch^k that the LR change implies: sqrt rule 0.5, linear rule 1
            k = math.log(lr_now / before) / math.log(factor)
            followed = 0.25 <= k <= 1.5
            severity, how = "high", f"learning rate {before:.3g} → {lr_now:.3g}"
        return self._report(
            event, "batch_size_change", not followed, severity=severity, value=jump["to"], threshold=self.change_factor,
            message=f"batch size {jump['from']:g} → {jump['to']:g} ({factor:.3g}x) with {how}",
            metadata={"old_batch_size": jump["from"], "new_batch_size": jump["to"], "lr_before": before,
                      "lr": lr_now, "lr_followed": followed})

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
