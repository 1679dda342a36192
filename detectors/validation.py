"""Validation detectors: validation loss rising while the training loss falls, and overtraining.

Evaluations are sparse (every N steps), so these detectors count *evaluations*, not steps, and keep an EMA
of the training loss between evaluations to know which way training is going.
"""

from __future__ import annotations

import math
import re
import statistics
from functools import lru_cache
from itertools import pairwise

from .alerts import Alert
from .base import Detector, all_finite, column, may_have, register_detector
from .events import MetricEvent
from .stats import compact, ema, push, robust_center_scale

__all__ = ["ValTrainDivergenceDetector", "VALIDATION_DEFAULTS", "eval_set"]

VALIDATION_DEFAULTS = {
    "rise_threshold": 0.1,
    "noise_threshold": 3.0,
    "noise_window": 20,
    "patience": 5,
    "overtrain_evals": 8,
    "train_span": 20,
    "resolve_after": 3,
    "undo_fraction": 0.02,
}

#: a named evaluation set's loss: Hugging Face's ``eval_<set>_loss`` (an ``eval_dataset`` dict; ``eval/<set>_loss``
#: once W&B has it) and Lightning's ``val_loss/dataloader_idx_<n>`` (several validation loaders) — not YOLO's
#: ``val/box_loss``, ``val/cls_loss``: parts of one validation loss, whose training parts are not the training loss
_EVAL_SET = re.compile(r"^eval[_/]([^/]+?)_loss$|^val_loss/(dataloader_idx_\d+)$")

#: a validation set's own state (the training-loss EMA and the point count are the run's, shared by all sets)
_SET_FIELDS = ("best_val", "best_step", "train_at_best", "evals_since_best", "run_length", "vals", "rises", "evals",
               "first_val")


@lru_cache(maxsize=4096)
def eval_set(name: str) -> str | None:
    """The evaluation set a (canonical) metric name is the loss of, None if it is none of them.

    >>> eval_set("eval_wikitext_loss"), eval_set("val_loss/dataloader_idx_1"), eval_set("val_loss"), eval_set("loss")
    ('wikitext', 'dataloader_idx_1', None, None)
    >>> eval_set("val/box_loss"), eval_set("eval_runtime")   # a YOLO validation-loss part; not a loss at all
    (None, None)
    """
    found = _EVAL_SET.match(name)
    return None if found is None else found.group(1) or found.group(2)


@lru_cache(maxsize=1024)
def _has_sets(names: tuple[str, ...]) -> bool:
    return any(map(eval_set, names))


def _noise(vals: list[float]) -> float:
    """The noise σ of evaluations: the robust spread (MAD around the median, so a steady descent is not noise)
    of their eval-to-eval changes, over √2."""
    return robust_center_scale([b - a for a, b in pairwise(vals)])[1] / math.sqrt(2)


@register_detector
class ValTrainDivergenceDetector(Detector):
    """Validation loss rising above its best while the training loss keeps falling (overfitting).

    At each evaluation the validation loss is compared with the best so far, and the smoothed training
    loss with its value at that best evaluation. ``val_train_divergence`` is active when validation is more
    than ``rise_threshold`` (relative) *and* ``noise_threshold`` noise σ above its best while training is
    lower than it was then — and the rise undoes more than ``undo_fraction`` of what validation learned
    (first − best): a validation loss at a floor near 0, printed to 4 decimals, doubles a tiny best by
    rounding and wandering alone. The noise σ is the robust spread (MAD around the median, so a steady descent
    is not noise) of the eval-to-eval changes of the last ``noise_window`` evaluations, over √2: a small
    validation set jitters, and a best evaluation is partly luck. One evaluation is ``low`` (a noisy
    validation set), two in a row ``medium``, three (or ``patience``) at twice the rise ``high`` — a run
    may evaluate only 5–10 times in all — and ``critical`` when it lasts ``2·patience`` at 3× the rise.
    Three evaluations in a row each above the last, ending over a third of ``rise_threshold`` above the
    best, are ``high`` too where the noise test has little to go on: with no training loss at all (a
    history of evaluations only), and in an epoch log (an evaluation at every other point or more) while
    training improves, the rise is past ``noise_threshold`` noise σ and that noise is small (its
    ``noise_threshold`` σ under ``rise_threshold`` of the best) — until the run has had ``noise_window``
    evaluations: by then the noise test has its full window, and over 150 evaluations three rises in a row
    come by chance. In an epoch log, five evaluations each above
    the last (1 in 120 by chance) past ``rise_threshold`` are ``high`` whatever the noise estimate says: a
    steady climb's own steps inflate it.
    ``overtraining`` (``low``, ``medium`` while validation is also rising past its noise) says the best checkpoint is
    ``overtrain_evals`` evaluations old while training improves: the rest of the run is wasted compute.
    Each named evaluation set (:func:`eval_set`: ``eval_<set>_loss``, ``val_loss/dataloader_idx_<n>``) is judged
    on its own, against the same training loss, with its own episodes: one set can overfit while another
    still improves.

    >>> from detectors.events import MetricEvent
    >>> d = ValTrainDivergenceDetector()
    >>> out = []
    >>> for s in range(1, 801):
    ...     m = {"loss": 2.0 * math.exp(-s / 150)}
    ...     if s % 50 == 0:
    ...         m["val_loss"] = 0.8 + 0.002 * (s - 300) ** 2 / 100
    ...     out += d.update(MetricEvent("r", s, m))
    >>> [(a.alert_type, a.severity, a.step) for a in out]
    [('val_train_divergence', 'low', 500), ('val_train_divergence', 'medium', 550), ('val_train_divergence', 'high', 600), ('overtraining', 'medium', 700)]
    >>> d = ValTrainDivergenceDetector()   # validation losses only, as a nanoGPT user pasted them
    >>> vals = [2.11, 1.77, 1.59, 1.52, 1.49, 1.51, 1.52, 1.56]
    >>> [(a.severity, a.step) for i, v in enumerate(vals) for a in d.update(MetricEvent("r", 250 * (i + 1), {"val_loss": v}))]
    [('high', 2000)]
    """

    name = "val_train_divergence"
    category = "validation"
    section = "validation"
    defaults = VALIDATION_DEFAULTS
    metrics = ("loss", "val_loss")
    state_fields = ("train", "best_val", "best_step", "train_at_best", "evals_since_best", "run_length", "vals",
                    "rises", "points", "evals", "first_val", "sets")

    def reset(self) -> None:
        self.train: float | None = None
        self.best_val: float | None = None
        self.best_step: int | None = None
        self.train_at_best: float | None = None
        self.evals_since_best = 0
        self.run_length = 0
        self.vals: list[float] = []
        #: evaluations in a row, each above the one before
        self.rises = 0
        #: events with a training or validation loss, and those with a validation loss
        self.points = 0
        self.evals = 0
        #: the first validation loss (what validation learned is first − best)
        self.first_val: float | None = None
        #: named evaluation set → its own fields (``_SET_FIELDS``), for runs with several
        self.sets: dict[str, dict] = {}

    def reads(self, names: tuple[str, ...]) -> bool:
        return "loss" in names or "val_loss" in names or _has_sets(names)

    def update_batch(self, events: list[MetricEvent]) -> list[tuple[int, Alert]]:
        # most steps carry only a training loss, which moves nothing but its EMA: those are folded in
        # right here, and the evaluation steps go through update
        alpha, train, raised = 2.0 / (self.train_span + 1), self.train, []
        names = getattr(events, "names", None)
        if not may_have(events, "val_loss") and not (names and _has_sets(names)):
            losses = column(events, "loss")
            if all_finite(losses):  # no evaluation in the batch: the training-loss EMA, and nothing else
                start = 0
                if train is None:
                    train, start = float(losses[0]), 1
                for loss in losses[start:]:
                    train = train + alpha * (loss - train)
                self.train = train
                self.points += len(losses)
                return []
        for i, (loss, val) in enumerate(zip(column(events, "loss"), column(events, "val_loss"), strict=True)):
            if val is not None or (_has_sets(names) if names else _has_sets(tuple(events[i].metrics))):
                self.train = train
                raised += [(i, alert) for alert in self.update(events[i])]
                train = self.train
            elif loss is not None and math.isfinite(loss):
                train = float(loss) if train is None else train + alpha * (loss - train)
                self.points += 1
        self.train = train
        return raised

    def update(self, event: MetricEvent) -> list[Alert]:
        metrics = event.metrics
        loss = metrics.get("loss")
        trained = loss is not None and math.isfinite(loss)
        if trained:
            self.train = ema(self.train, loss, 2.0 / (self.train_span + 1))
            self.points += 1
        val = metrics.get("val_loss")
        judged = [("val_loss", val)] if val is not None and math.isfinite(val) else []
        if _has_sets(tuple(metrics)):
            judged += [(name, v) for name, v in metrics.items() if eval_set(name) and math.isfinite(v)]
        if not judged:
            return []
        self.points += not trained
        alerts = []
        for name, v in judged:
            if name == "val_loss":
                alerts += self._judge(event, v, name)
                continue
            own = {f: getattr(self, f) for f in _SET_FIELDS}  # the set's fields stand in for the run's
            kept = self.sets.get(name)
            if kept is None:
                self._reset_set()
            else:
                for f in _SET_FIELDS:
                    setattr(self, f, kept[f])
            try:
                alerts += self._judge(event, v, name)
            finally:
                self.sets[name] = {f: getattr(self, f) for f in _SET_FIELDS}
                for f, value in own.items():
                    setattr(self, f, value)
        return alerts

    def _reset_set(self) -> None:
        """A fresh evaluation set's fields (``_SET_FIELDS``)."""
        sets, points, train = self.sets, self.points, self.train
        self.reset()
        self.sets, self.points, self.train = sets, points, train

    def _judge(self, event: MetricEvent, val: float, metric: str) -> list[Alert]:
        """One evaluation of one validation set (``metric``), against the run's training loss."""
        self.evals += 1
        if self.first_val is None:
            self.first_val = compact(val)
        if self.best_val is None or val < self.best_val:
            self.best_val, self.best_step, self.train_at_best = compact(val), event.step, self.train
            self.evals_since_best = 0
        else:
            self.evals_since_best += 1
        if self.train_at_best is None:
            # the best came before any training loss was logged (evaluations every epoch, the loss every 500
            # steps): the first training loss seen since stands in for the one at the best
            self.train_at_best = self.train
        train_falling = (self.train is not None and self.train_at_best is not None
                         and self.train < self.train_at_best)
        self.rises = self.rises + 1 if self.vals and val > self.vals[-1] else 0
        push(self.vals, val, self.noise_window)
        # a spread of fewer than 4 changes is no estimate (three rises of a quiet excerpt look like a trend)
        noise = _noise(self.vals) if len(self.vals) >= 5 else math.inf
        rise = (val - self.best_val) / abs(self.best_val) if self.best_val else 0.0
        # and by a part of what validation learned: at a floor near 0, printed to 4 decimals, a tiny best
        # doubles without anything going wrong (the divergence detector asks the same of the training loss)
        undone = val - self.best_val > self.undo_fraction * (self.first_val - self.best_val)
        active = (train_falling and undone and rise > self.rise_threshold
                  and val - self.best_val > self.noise_threshold * noise)
        # a history of evaluations alone (no training loss logged) has nothing to compare with, and an
        # epoch log (an evaluation at every other point or more: each a whole validation set's mean, not
        # a noisy mid-epoch probe) few points to learn its noise from: there, evaluations that rise one
        # after another past a third of the threshold while training improves are the trend
        epoch_log = train_falling and 2 * self.evals >= self.points
        # the rise is measured from the level the evaluations held before the climb (their median, and their
        # noise), not from the best alone: a best is the luckiest evaluation, and the ones after it rise by chance
        before = self.vals[:len(self.vals) - self.rises]
        level = max(self.best_val, statistics.median(before[-self.noise_window:])) if len(before) >= 3 else self.best_val
        quiet = self.noise_threshold * noise < min(val - level, self.rise_threshold * self.best_val)
        val_only = undone and (
            (self.rises >= 1 and rise > self.rise_threshold / 3 and (self.train is None or epoch_log and quiet
                                                                      and self.evals <= self.noise_window))
            # five evaluations of an epoch log each above the last (1 in 120 by chance), past the threshold
            # and past the noise the evaluations showed before the climb (the climb's own steps would
            # inflate it): after a lucky best, a noisy set rises four times in a row by chance soon enough
            # (with fewer than 4 changes before it, a fragment, there is no noise to clear)
            or (epoch_log and self.rises >= 4 and rise > self.rise_threshold
                and val - self.best_val > self.noise_threshold * (_noise(before) if len(before) >= 5 else 0.0)))
        active = active or val_only
        self.run_length = self.run_length + 1 if active else 0
        # one evaluation above the best is a noisy validation set; several in a row are a trend
        severity = ("critical" if active and rise > 3 * self.rise_threshold and self.run_length >= 2 * self.patience
                    else "high" if self.run_length >= self.patience or (
                        self.run_length >= 3 and rise > 2 * self.rise_threshold) or (val_only and self.rises >= 3)
                    else "medium" if self.run_length >= 2 or (val_only and self.rises >= 2) else "low")
        alerts = self._report(
            event, "val_train_divergence", active, severity=severity, value=val,
            threshold=self.best_val * (1 + self.rise_threshold),
            key=None if metric == "val_loss" else f"val_train_divergence:{metric}",
            message=(f"{metric} {val:.4g} is {rise:.0%} above its best {self.best_val:.4g} (step "
                     f"{self.best_step}) "
                     + (f"while the training loss fell to {self.train:.4g}" if self.train is not None
                        else "with no training loss logged")
                     + f" for {self.run_length} evaluation(s), rising {self.rises} in a row"),
            metadata={"best_val": self.best_val, "best_step": self.best_step, "train": self.train,
                      "train_at_best": self.train_at_best, "evaluations": self.run_length, "noise": noise})
        overtrained = train_falling and self.evals_since_best >= self.overtrain_evals
        alerts += self._report(
            event, "overtraining", overtrained, severity="medium" if self.run_length >= 2 else "low",
            value=val, threshold=self.best_val,
            key=None if metric == "val_loss" else f"overtraining:{metric}",
            message=(f"no better {metric} than {self.best_val:.4g} (step {self.best_step}) in "
                     f"{self.evals_since_best} evaluations while training improves; the best checkpoint "
                     f"is behind you"),
            metadata={"best_step": self.best_step, "evaluations_since_best": self.evals_since_best})
        return alerts
