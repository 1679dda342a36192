"""The baselines lossguard is measured against, each re-implemented from its source as a small class.

Every baseline watches one run step by step — ``update(step, metrics) -> bool`` says whether it
raises an alarm at that step — with its published defaults. Where the original stops training on an
alarm (Keras, Lightning, llm-foundry) the class records the alarm and keeps watching, as if the run had
been resumed past the bad batch, so that later alarms (false or true) are counted too. Non-finite
values are handled exactly as the original handles them, quirks included (llm-foundry's window and
River's running mean turn NaN once a NaN enters them, so they stay silent afterwards).

Sources:

* ``keras.callbacks.TerminateOnNaN`` (keras/src/callbacks/terminate_on_nan.py): stop when
  ``logs["loss"]`` is NaN or ±Inf at the end of a batch.
* Lightning ``SpikeDetection`` (src/lightning/fabric/utilities/spike.py, used by
  lightning/pytorch/callbacks/spike.py): a running mean over ``window=10`` batches; after ``warmup=1``
  a loss is a spike when it is non-finite, or when it is not better than the previous loss and
  ``|loss - mean| >= rtol * |mean|`` (``rtol=2.0``, ``atol=None``); spikes do not enter the mean.
* llm-foundry ``KillLossSpike`` (llmfoundry/callbacks/kill_loss_spike_callback.py): once the
  ``window_size=100`` window is full, more than ``patience=4`` consecutive losses at or above
  ``outlier_multiplier=2`` × the window mean is a spike; else half the window above ``loss_cap=10`` after
  ``2 * window_size`` batches is a high-loss alarm.
* W&B-style z-score alert (the rolling-statistics alert users write around ``wandb.alert``): ``|z| > 3``
  for the loss against the mean and standard deviation of the previous 30 logged losses.
* SageMaker Debugger ``LossNotDecreasing`` (built-in rule, documented parameters ``num_steps=10``,
  ``diff_percent=0``, mode order EVAL → TRAIN): every ``num_steps`` the loss must be below the loss at
  the last checked step; the rule reads the validation loss when the run logs one, else the training loss.
* SageMaker Debugger ``Overfit`` (``start_step=0``, ``patience=1``, ``ratio_threshold=0.1``): at each
  validation step, ``(mean val loss - mean train loss) / mean train loss`` above the threshold for
  ``patience`` checks in a row.
* River ``drift.PageHinkley`` (river/drift/page_hinkley.py, ``min_instances=30, delta=0.005,
  threshold=50, alpha=0.9999``) over the loss, ``mode="up"``: a loss monitor cares about increases, and
  River's default ``"both"`` fires on every healthy run whose loss goes down. It resets after a drift.

>>> b = TerminateOnNaN()
>>> [b.update(s, {"loss": x}) for s, x in enumerate([2.3, 1.9, float("nan")])]
[False, False, True]
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping

__all__ = ["BASELINES", "Baseline", "TerminateOnNaN", "SpikeDetection", "KillLossSpike", "ZScoreAlert",
           "LossNotDecreasing", "Overfit", "PageHinkley"]


class Baseline:
    """One baseline watching one run. ``update`` is called once per logged step, in step order."""

    name = ""

    def __init__(self, metrics_in_run: frozenset[str] = frozenset()):
        self.metrics_in_run = metrics_in_run

    def update(self, step: int, metrics: Mapping[str, float]) -> bool:
        raise NotImplementedError


class TerminateOnNaN(Baseline):
    name = "keras_TerminateOnNaN"

    def update(self, step: int, metrics: Mapping[str, float]) -> bool:
        loss = metrics.get("loss")
        return loss is not None and (math.isnan(loss) or math.isinf(loss))


class SpikeDetection(Baseline):
    name = "lightning_SpikeDetection"

    def __init__(self, metrics_in_run: frozenset[str] = frozenset(), mode: str = "min", window: int = 10,
                 warmup: int = 1, atol: float | None = None, rtol: float | None = 2.0,
                 finite_only: bool = True):
        super().__init__(metrics_in_run)
        self.mode, self.warmup, self.atol, self.rtol, self.finite_only = mode, warmup, atol, rtol, finite_only
        self.running: deque[float] = deque(maxlen=window)
        self.last_val = 0.0
        self.batch_idx = 0

    def update(self, step: int, metrics: Mapping[str, float]) -> bool:
        loss = metrics.get("loss")
        if loss is None:
            return False
        batch_idx, self.batch_idx = self.batch_idx, self.batch_idx + 1
        if batch_idx >= self.warmup and self._is_spike(loss):
            return True
        if self.finite_only or math.isfinite(loss):
            self.running.append(loss)
            self.last_val = loss
        return False

    def _is_spike(self, loss: float) -> bool:
        running_val = sum(self.running) / len(self.running) if self.running else math.nan
        if self.finite_only and not math.isfinite(loss):
            return True
        diff = loss - self.last_val
        if (diff <= 0.0) if self.mode == "min" else (diff >= 0.0):
            return False
        atol_ok = self.atol is None or abs(loss - running_val) >= abs(self.atol)
        rtol_ok = self.rtol is None or abs(loss - running_val) >= abs(self.rtol * running_val)
        return atol_ok and rtol_ok


class KillLossSpike(Baseline):
    name = "llmfoundry_KillLossSpike"

    def __init__(self, metrics_in_run: frozenset[str] = frozenset(), patience: int = 4,
                 outlier_multiplier: float = 2, window_size: int = 100, loss_cap: float = 10):
        super().__init__(metrics_in_run)
        self.patience, self.outlier_multiplier = patience, outlier_multiplier
        self.window_size, self.loss_cap = window_size, loss_cap
        self.outlier_counter = 0
        self.loss_window: deque[float] = deque(maxlen=window_size)

    def update(self, step: int, metrics: Mapping[str, float]) -> bool:
        loss = metrics.get("loss")
        if loss is None:
            return False
        alarm = False
        if len(self.loss_window) == self.window_size:
            running_loss_avg = sum(self.loss_window) / len(self.loss_window)
            if self._detect_loss_spike(loss, running_loss_avg):
                alarm = True
            elif step >= self.window_size * 2 and \
                    sum(1 for x in self.loss_window if x > self.loss_cap) >= self.window_size / 2:
                alarm = True
        self.loss_window.append(loss)
        return alarm

    def _detect_loss_spike(self, train_loss: float, running_loss_avg: float) -> bool:
        if train_loss >= running_loss_avg * self.outlier_multiplier:
            self.outlier_counter += 1
            return self.outlier_counter > self.patience
        if self.outlier_counter > 0:
            self.outlier_counter = 0
        return False


class ZScoreAlert(Baseline):
    name = "wandb_zscore"

    def __init__(self, metrics_in_run: frozenset[str] = frozenset(), window: int = 30, sigmas: float = 3.0,
                 metric: str = "loss"):
        super().__init__(metrics_in_run)
        self.window: deque[float] = deque(maxlen=window)
        self.sigmas, self.metric = sigmas, metric

    def update(self, step: int, metrics: Mapping[str, float]) -> bool:
        x = metrics.get(self.metric)
        if x is None or not math.isfinite(x):
            return False
        alarm = False
        if len(self.window) == self.window.maxlen:
            mean = sum(self.window) / len(self.window)
            std = math.sqrt(sum((v - mean) ** 2 for v in self.window) / len(self.window))
            alarm = std > 0 and abs(x - mean) / std > self.sigmas
        self.window.append(x)
        return alarm


class LossNotDecreasing(Baseline):
    name = "smdebug_LossNotDecreasing"

    def __init__(self, metrics_in_run: frozenset[str] = frozenset(), num_steps: int = 10,
                 diff_percent: float = 0.0):
        super().__init__(metrics_in_run)
        self.metric = "val_loss" if "val_loss" in metrics_in_run else "loss"
        self.num_steps, self.diff_percent = num_steps, diff_percent
        self.last: tuple[int, float] | None = None

    def update(self, step: int, metrics: Mapping[str, float]) -> bool:
        loss = metrics.get(self.metric)
        if loss is None or (self.last is not None and step - self.last[0] < self.num_steps):
            return False
        previous, self.last = self.last, (step, loss)
        return previous is not None and loss > (100 - self.diff_percent) / 100 * previous[1]


class Overfit(Baseline):
    name = "smdebug_Overfit"

    def __init__(self, metrics_in_run: frozenset[str] = frozenset(), start_step: int = 0, patience: int = 1,
                 ratio_threshold: float = 0.1):
        super().__init__(metrics_in_run)
        self.start_step, self.patience, self.ratio_threshold = start_step, patience, ratio_threshold
        self.train_losses: list[float] = []
        self.exceeded = 0

    def update(self, step: int, metrics: Mapping[str, float]) -> bool:
        if "loss" in metrics:
            self.train_losses.append(metrics["loss"])
        val = metrics.get("val_loss")
        if val is None or step < self.start_step or not self.train_losses:
            return False
        train = sum(self.train_losses) / len(self.train_losses)
        self.train_losses = []
        ratio = (val - train) / train if train else math.inf
        self.exceeded = self.exceeded + 1 if ratio > self.ratio_threshold else 0
        return self.exceeded >= self.patience


class PageHinkley(Baseline):
    name = "river_PageHinkley"

    def __init__(self, metrics_in_run: frozenset[str] = frozenset(), min_instances: int = 30,
                 delta: float = 0.005, threshold: float = 50.0, alpha: float = 1 - 0.0001, mode: str = "up"):
        super().__init__(metrics_in_run)
        self.min_instances, self.delta, self.threshold, self.alpha, self.mode = (
            min_instances, delta, threshold, alpha, mode)
        self.drift_detected = False
        self._reset()

    def _reset(self) -> None:
        self.n, self.mean = 0, 0.0
        self.sum_increase = self.sum_decrease = 0.0
        self.min_increase, self.max_decrease = math.inf, -1.0

    def update(self, step: int, metrics: Mapping[str, float]) -> bool:
        x = metrics.get("loss")
        if x is None:
            return False
        if self.drift_detected:
            self._reset()
        self.n += 1
        self.mean += (x - self.mean) / self.n
        dev = x - self.mean
        self.sum_increase = self.alpha * self.sum_increase + dev - self.delta
        self.sum_decrease = self.alpha * self.sum_decrease + dev + self.delta
        self.min_increase = min(self.min_increase, self.sum_increase)
        self.max_decrease = max(self.max_decrease, self.sum_decrease)
        self.drift_detected = False
        if self.n >= self.min_instances:
            up = self.sum_increase - self.min_increase > self.threshold
            down = self.max_decrease - self.sum_decrease > self.threshold
            self.drift_detected = {"up": up, "down": down, "both": up or down}[self.mode]
        return self.drift_detected


BASELINES: tuple[type[Baseline], ...] = (TerminateOnNaN, SpikeDetection, KillLossSpike, ZScoreAlert,
                                         LossNotDecreasing, Overfit, PageHinkley)
