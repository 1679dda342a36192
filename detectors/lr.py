"""Learning-rate detectors: out of range, stuck at zero, and sudden changes the schedule does not explain.

Both read ``lr`` (HF ``learning_rate``, Lightning ``lr-AdamW`` ... through the alias map) and share the
``[learning_rate]`` section.
"""

from __future__ import annotations

import math

from .alerts import Alert
from .base import Detector, all_finite, column, register_detector
from .events import MetricEvent
from .stats import compact, median, push

__all__ = ["LearningRateRangeDetector", "LearningRateChangeDetector", "LEARNING_RATE_DEFAULTS"]

LEARNING_RATE_DEFAULTS = {
    "change_threshold": 0.3,
    "min_lr": 1e-8,
    "max_lr": 1.0,
    "window": 20,
    "explained_factor": 4.0,
    "low_steps": 10,
    "stuck_steps": 50,
    "zero_steps": 3,
    "confirm_factor": 1.5,
    "resolve_after": 20,
}


@register_detector
class LearningRateRangeDetector(Detector):
    """Learning rate outside ``[min_lr, max_lr]``: too high, too low, or stuck at zero.

    Above ``max_lr`` is ``medium`` at once — a setting outside the configured range, which some recipes
    use on purpose (large-batch SGD with clipping) — and ``high`` once the loss confirms it: the median of
    its last 5 values rises to ``confirm_factor``× its best since the LR left the range (one noisy step
    confirms nothing), it makes no progress (after ``window`` steps out of range the recent median is
    still at or above the first loss seen there), or it stops being finite. Above 10× ``max_lr``
    the same two levels are ``high`` and ``critical``. Below ``min_lr`` is ``medium`` after ``low_steps`` steps that are not
    a warm-up climbing from zero; at or below ``min_lr`` for ``stuck_steps`` steps is ``lr_stuck_zero``,
    ``high`` — a scheduler that never started, or a decay that ended the learning long before the run.
    A learning rate that *drops* to zero — by more than ``explained_factor``× the schedule's largest
    recent step change (a linear or cosine decay reaches zero by its own last small step) — is
    ``lr_stuck_zero`` ``high`` after ``zero_steps`` observations: a scheduler or optimizer bug.

    >>> from detectors.events import MetricEvent
    >>> d = LearningRateRangeDetector()
    >>> [(a.alert_type, a.severity) for s, loss in enumerate([2.0, 1.9, 2.2, 3.5, 3.1, 3.3, 2.9])
    ...  for a in d.update(MetricEvent("r", s, {"lr": 3.0, "loss": loss}))]
    [('lr_too_high', 'medium'), ('lr_too_high', 'high')]
    >>> d = LearningRateRangeDetector()
    >>> [(a.alert_type, a.step) for s in range(0, 80) for a in d.update(MetricEvent("r", s, {"lr": 0.0}))]
    [('lr_stuck_zero', 50)]
    >>> d = LearningRateRangeDetector()
    >>> lrs = [3e-2] * 100 + [0.0] * 10
    >>> [(a.alert_type, a.step) for s, lr in enumerate(lrs) for a in d.update(MetricEvent("r", s, {"lr": lr}))]
    [('lr_stuck_zero', 102)]
    >>> d = LearningRateRangeDetector()
    >>> linear = [3e-2 * (1 - s / 99) for s in range(100)]   # linear decay to exactly zero at the last step
    >>> [a for s, lr in enumerate(linear + [0.0]) for a in d.update(MetricEvent("r", s, {"lr": lr}))]
    []
    """

    name = "lr_range"
    category = "learning_rate"
    section = "learning_rate"
    defaults = LEARNING_RATE_DEFAULTS
    metrics = ("lr",)
    state_fields = ("low_since", "low_seen", "prev_lr", "moves", "dropped", "loss_best", "loss_first",
                    "recent_losses", "high_seen", "first_step")

    def reset(self) -> None:
        self.low_since: int | None = None
        self.low_seen = 0
        self.prev_lr: float | None = None
        #: absolute step-to-step LR changes of the last few steps (how fast the schedule moves)
        self.moves: list[float] = []
        #: the LR fell to ≤ min_lr in one step the schedule does not explain
        self.dropped = False
        #: the lowest loss seen while the LR has been above max_lr (None: LR in range)
        self.loss_best: float | None = None
        self.loss_first: float | None = None
        self.recent_losses: list[float] = []
        self.high_seen = 0
        #: the step of the run's first learning rate
        self.first_step: int | None = None

    def update(self, event: MetricEvent) -> list[Alert]:
        lr = event.metrics.get("lr")
        if lr is None or not math.isfinite(lr):
            return []
        if self.first_step is None:
            self.first_step = event.step
        alerts = self._too_high(event, lr)
        prev = self.prev_lr
        rising = prev is not None and lr > prev
        self.prev_lr = compact(lr)
        if lr > self.min_lr:
            self.low_since, self.low_seen, self.dropped = None, 0, False
        else:
            if self.low_since is None:
                self.low_since = event.step
                # a drop to zero bigger than the schedule's recent moves is a bug, not the end of a decay
                typical = max(self.moves, default=0.0)
                # (from well above min_lr: a cosine tail logged sparsely crosses min_lr in steps that look
                # large next to its last moves, but from just above it)
                self.dropped = prev is not None and prev > 100 * self.min_lr and prev > self.explained_factor * typical
            self.low_seen += 1
        if prev is not None:
            push(self.moves, abs(lr - prev), 5)
        low_for = -1 if self.low_since is None else event.step - self.low_since
        too_low = 0 < lr <= self.min_lr and low_for >= self.low_steps and not rising
        alerts += self._report(event, "lr_too_low", too_low, severity="low", value=lr,
                               threshold=self.min_lr,
                               message=f"learning rate {lr:.3g} below min_lr {self.min_lr:g} for {low_for} steps")
        # a schedule that decayed to zero is stuck only once it has stayed there for a quarter of the
        # steps it took to get there (a decay that ended long before the run did); the end of a run's
        # cosine or linear decay is not
        decayed_for = self.low_since - self.first_step if self.low_since is not None else 0
        stuck = (low_for >= self.stuck_steps and self.low_seen >= 3 and low_for >= 0.25 * decayed_for) or (
            self.dropped and self.low_seen >= self.zero_steps)
        how = "dropped to" if self.dropped else "has been"
        alerts += self._report(event, "lr_stuck_zero", stuck, severity="high", value=lr, threshold=self.min_lr,
                               message=f"learning rate {how} {lr:.3g} (≤ {self.min_lr:g}) at step "
                                       f"{self.low_since}: the model is not learning",
                               metadata={"since": self.low_since, "sudden": self.dropped})
        return alerts

    def update_batch(self, events: list[MetricEvent]) -> list[tuple[int, Alert]]:
        # a batch whose every LR is inside (min_lr, max_lr], with nothing open, only moves the schedule
        # bookkeeping: the LR-too-high and LR-low states reset, the recent moves slide on
        lrs = column(events, "lr")
        if self.episodes:
            return super().update_batch(events)
        prev = self.prev_lr
        if all_finite(lrs):
            if not (self.min_lr < min(lrs) and max(lrs) <= self.max_lr):
                return super().update_batch(events)
            if len(lrs) > 5:  # only the last 5 moves are kept: they need the last 6 LRs
                prev, lrs = compact(lrs[-6]), lrs[-5:]
        elif not all(x is None or not math.isfinite(x) or self.min_lr < x <= self.max_lr for x in lrs):
            return super().update_batch(events)
        moves, read = list(self.moves), False
        for lr in lrs:
            if lr is None or not math.isfinite(lr):
                continue
            if prev is not None:
                push(moves, abs(lr - prev), 5)
            prev, read = compact(lr), True
        if read:
            if self.first_step is None:
                self.first_step = next(e.step for e, lr in zip(events, column(events, "lr"), strict=True)
                                       if lr is not None and math.isfinite(lr))
            self.loss_best, self.loss_first, self.recent_losses, self.high_seen = None, None, [], 0
            self.low_since, self.low_seen, self.dropped = None, 0, False
            self.prev_lr, self.moves = prev, moves
        return []

    def _too_high(self, event: MetricEvent, lr: float) -> list[Alert]:
        if lr <= self.max_lr:
            self.loss_best, self.loss_first, self.recent_losses, self.high_seen = None, None, [], 0
            return self._report(event, "lr_too_high", False)
        self.high_seen += 1
        loss = event.metrics.get("loss")
        confirmed = False
        if loss is not None:
            if not math.isfinite(loss):
                confirmed = True
            else:
                push(self.recent_losses, compact(loss), 5)
                if self.loss_first is None:
                    self.loss_first = compact(loss)
                if self.loss_best is None or loss < self.loss_best:
                    self.loss_best = compact(loss)
                typical = median(self.recent_losses)
                rising = self.loss_best > 0 and typical >= self.confirm_factor * self.loss_best
                stuck = self.high_seen >= self.window and typical >= self.loss_first
                confirmed = len(self.recent_losses) == 5 and (rising or stuck)
        levels = ("high", "critical") if lr > 10 * self.max_lr else ("medium", "high")
        evidence = " and the loss is rising" if confirmed else ""
        return self._report(event, "lr_too_high", True, severity=levels[confirmed], value=lr,
                            threshold=self.max_lr, metadata={"loss_confirms": confirmed},
                            message=f"learning rate {lr:.4g} is above max_lr {self.max_lr:g}{evidence}")


@register_detector
class LearningRateChangeDetector(Detector):
    """A step-to-step LR change much larger than the schedule's own recent changes.

    The relative change ``|lr_t / lr_(t-1) - 1|`` is compared with the largest of the last 5 relative
    changes (the end of a cosine decay speeds up in relative terms, so a median lags): warm-up and cosine/linear decay change the LR by a similar fraction every step, so
    they explain themselves; a change above ``change_threshold`` *and* ``explained_factor``× the typical
    one is not explained. Increases to above the run's peak LR are the dangerous kind (``high``, ``critical``
    from 10×); a jump back to at most the peak (a warm restart) is ``low``, a drop (step decay,
    ReduceLROnPlateau) ``low``, a drop of 100× ``medium``.

    >>> from detectors.events import MetricEvent
    >>> d = LearningRateChangeDetector()
    >>> warmup = [3e-4 * (s + 1) / 100 for s in range(100)]
    >>> cosine = [3e-4 * 0.5 * (1 + math.cos(math.pi * s / 400)) for s in range(400)]
    >>> [a for s, lr in enumerate(warmup + cosine) for a in d.update(MetricEvent("r", s, {"lr": lr}))]
    []
    >>> [(a.alert_type, a.severity) for a in d.update(MetricEvent("r", 500, {"lr": 3e-2}))]
    [('lr_sudden_change', 'critical')]
    """

    name = "lr_change"
    category = "learning_rate"
    section = "learning_rate"
    defaults = LEARNING_RATE_DEFAULTS
    metrics = ("lr",)
    state_fields = ("prev_lr", "peak_lr", "changes")

    def reset(self) -> None:
        self.prev_lr: float | None = None
        self.peak_lr = 0.0
        self.changes: list[float] = []

    def update(self, event: MetricEvent) -> list[Alert]:
        lr = event.metrics.get("lr")
        if lr is None or not math.isfinite(lr):
            return []
        prev, peak = self.prev_lr, self.peak_lr
        self.prev_lr, self.peak_lr = compact(lr), compact(max(peak, lr))
        if prev is None or prev <= 0 or lr <= 0:
            return []  # a change from or to zero has no ratio; lr_range watches zero
        change = abs(lr / prev - 1)
        if len(self.changes) < 5:
            push(self.changes, change, self.window)
            return []
        typical = max(self.changes[-5:])
        if change <= self.change_threshold or change <= self.explained_factor * typical:
            push(self.changes, change, self.window)
            return self._report(event, "lr_sudden_change", False)
        factor = lr / prev
        if factor > 1 and lr > 1.2 * peak:
            severity = "critical" if factor >= 10 else "high" if factor >= 2 else "medium"
            kind = "jumped above the run's peak"
        elif factor > 1:
            severity, kind = "low", "rose back (a warm restart?)"
        else:
            severity, kind = ("medium" if factor <= 0.01 else "low"), "dropped"
        return self._report(
            event, "lr_sudden_change", True, severity=severity, value=lr, threshold=self.change_threshold,
            message=(f"learning rate {kind}: {prev:.3g} → {lr:.3g} ({factor:.3g}x) where the schedule "
                     f"changed it by {typical:.2%} per step"),
            metadata={"previous": prev, "factor": factor, "typical_change": typical, "peak": peak})

    def update_batch(self, events: list[MetricEvent]) -> list[tuple[int, Alert]]:
        # update's arithmetic in one loop; the first unexplained change sends the whole batch (state
        # untouched) to the step-by-step path
        if "lr_sudden_change" in self.episodes:
            return super().update_batch(events)
        prev, peak, changes = self.prev_lr, self.peak_lr, list(self.changes)
        lrs = column(events, "lr")
        if prev is not None and prev > 0 and peak is not None and peak >= prev and lrs.count(prev) == len(lrs):
            # a constant LR (already compact, so it stays itself): every change is 0.0, which never fires
            self.changes = [*changes, *[0.0] * len(lrs)][-self.window:]
            return []
        for lr in lrs:
            if lr is None or not math.isfinite(lr):
                continue
            last, prev, peak = prev, compact(lr), compact(max(peak, lr))
            if last is None or last <= 0 or lr <= 0:
                continue
            change = abs(lr / last - 1)
            if len(changes) >= 5 and change > self.change_threshold and change > self.explained_factor * max(
                    changes[-5:]):
                return super().update_batch(events)
            push(changes, change, self.window)
        self.prev_lr, self.peak_lr, self.changes = prev, peak, changes
        return []
