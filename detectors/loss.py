"""Loss detectors.

``LossSpikeDetector`` compares each loss with the median of the last ``window`` healthy losses, scaled
by their median absolute deviation (MAD, a robust σ: 1.4826·MAD estimates σ for Gaussian noise, and a
few outliers cannot inflate it the way they inflate a standard deviation). A positive loss is compared
in log space: minibatch losses are skewed, their logs much less so. A step is a spike when it is more
than ``threshold`` robust σ *and* ``min_rel_increase`` (relative) above the median. Spikes do not
enter the window, so a burst cannot raise its own baseline. Severity grows with persistence and size: a
lone step stays ``medium`` however large (a hard batch on a healthy run); ``high`` after
``persist_high`` spiking steps in a row; ``critical`` after ``persist_critical`` steps or a second step
at ``ratio_critical``×. A negative loss (an RL surrogate objective) switches it off for the run.

The convergence detectors below share the ``[convergence]`` section and smooth the loss with an EMA of
span ``span`` first: a minibatch loss is a noisy sample, its trend is what converges or diverges.

>>> import random
>>> from detectors.events import MetricEvent
>>> rng = random.Random(0)
>>> d = LossSpikeDetector()
>>> alerts = [a for s in range(200) for a in d.update(MetricEvent("r", s, {"loss": 2.0 - s / 200 + rng.gauss(0, 0.02)}))]
>>> alerts
[]
>>> [(a.alert_type, a.severity) for s in range(200, 205) for a in d.update(MetricEvent("r", s, {"loss": 9.0}))]
[('loss_spike', 'medium'), ('loss_spike', 'high'), ('loss_spike', 'critical')]
"""

from __future__ import annotations

import math

import numpy as np

from .alerts import Alert
from .base import Detector, register_detector
from .events import MetricEvent
from .stats import ema, push

__all__ = ["LossSpikeDetector", "LossDivergenceDetector", "LossPlateauDetector", "LossOscillationDetector",
           "CONVERGENCE_DEFAULTS"]


@register_detector
class LossSpikeDetector(Detector):
    name = "loss_spike"
    category = "loss"
    section = "loss_spike"
    defaults = {
        "metric": "loss",
        "window": 50,
        "warmup": 20,
        "threshold": 6.0,
        "min_rel_increase": 0.25,
                "ratio_critical": 10.0,
        "persist_high": 2,
        "persist_critical": 3,
        "resolve_after": 20,
    }
    state_fields = ("history", "run_length", "signed")

    def reset(self) -> None:
        self.history: list[float] = []
        self.run_length = 0
        self.signed = False

    def update(self, event: MetricEvent) -> list[Alert]:
        x = event.metrics.get(self.metric)
        if x is None or not math.isfinite(x) or self.signed:
            return []
        if x < 0:
            # a loss that goes negative is an RL surrogate/objective, centred near 0: ratios to its
            # median are meaningless, so the detector stands down for the run (rlhf.py watches RL runs)
            self.signed = True
            return self._report(event, "loss_spike", False)
        if len(self.history) < self.warmup:
            self._remember(x)
            return []
        window = np.asarray(self.history)
        median = float(np.median(window))
        floor = median + abs(median) * self.min_rel_increase
        if x > 0 and window.min() > 0:
            # a positive loss is tested in log space: minibatch losses are skewed (a few hard batches
            # of several times the median are normal late in small-batch training), their logs are not
            logs = np.log(window)
            log_median = float(np.median(logs))
            log_sigma = 1.4826 * float(np.median(np.abs(logs - log_median)))
            limit = max(math.exp(log_median + self.threshold * log_sigma), floor)
            sigma = log_sigma
            z = (math.log(x) - log_median) / log_sigma if log_sigma > 0 else math.inf
        else:
            sigma = 1.4826 * float(np.median(np.abs(window - median)))
            limit = max(median + self.threshold * sigma, floor)
            z = (x - median) / sigma if sigma > 0 else math.inf
        if x <= limit:
            self.run_length = 0
            self._remember(x)
            return self._report(event, "loss_spike", False)
        self.run_length += 1
        ratio = x / median if median > 0 else math.inf
        if self.run_length >= self.persist_critical or (ratio >= self.ratio_critical and self.run_length > 1):
            severity = "critical"
        elif self.run_length >= self.persist_high:
            # never on the first step, however large: one hard batch on a healthy run is a blip
            severity = "high"
        else:
            severity = "medium"
        return self._report(
            event, "loss_spike", True, severity=severity, value=x, threshold=limit,
            message=(f"{self.metric} {x:.4g} is {ratio:.2f}x its recent median {median:.4g} "
                     f"({z:.1f} robust sigma) for {self.run_length} step(s)"),
            metadata={"median": median, "robust_sigma": sigma, "ratio": ratio, "consecutive": self.run_length},
        )

    def _remember(self, x: float) -> None:
        push(self.history, x, self.window)


#: the ``[convergence]`` section (the first two keys are users' existing keys)
CONVERGENCE_DEFAULTS = {
    "plateau_threshold": 0.001,
    "plateau_window": 50,
    "metric": "loss",
    "span": 10,
    "warmup": 20,
    "divergence_threshold": 0.5,
    "divergence_steps": 10,
    "stagnation_improvement": 0.01,
    "oscillation_window": 20,
    "oscillation_amplitude": 0.3,
    "resolve_after": 20,
}


class _SmoothedLoss(Detector):
    """An EMA of the loss and an EMA of its absolute deviation from it (a noise scale ≈ 0.8 σ).

    Only for losses that are never negative (cross-entropy, MSE, DPO): the first negative value turns the
    convergence detectors off for the run.
    """

    category = "convergence"
    section = "convergence"
    defaults = CONVERGENCE_DEFAULTS
    state_fields = ("smooth", "absdev", "seen", "signed")

    def reset(self) -> None:
        self.smooth: float | None = None
        self.absdev = 0.0
        self.seen = 0
        self.signed = False

    def _observe(self, event: MetricEvent) -> float | None:
        """The loss, or None when absent, non-finite, or the run's loss is not a convergence curve."""
        x = event.metrics.get(self.metric)
        if x is None or not math.isfinite(x) or self.signed:
            return None
        if x < 0:
            # a negative loss (policy-gradient surrogate, an RL objective) is not bounded below by 0;
            # "above its best" and "no improvement" mean nothing for it: off for the rest of the run
            self.signed = True
            return None
        alpha = 2.0 / (self.span + 1)
        if self.smooth is not None:
            self.absdev = ema(self.absdev, abs(x - self.smooth), alpha)
        self.smooth = ema(self.smooth, x, alpha)
        self.seen += 1
        return x


@register_detector
class LossDivergenceDetector(_SmoothedLoss):
    """Sustained divergence: the smoothed loss climbs well above the best it reached, and stays there.

    Active when the smoothed loss is more than ``divergence_threshold`` (relative) above its running
    minimum *and* that rise is over 2× the loss noise (so a noisy late-training loss near zero does not
    trip a relative test). ``medium`` at once, ``high`` after ``divergence_steps`` steps in a row,
    ``critical`` when it also exceeds the loss at the start of the run — everything learned is undone.

    >>> import random
    >>> from detectors.events import MetricEvent
    >>> rng = random.Random(0)
    >>> d = LossDivergenceDetector()
    >>> healthy = [2.3 * math.exp(-s / 60) + 0.3 + rng.gauss(0, 0.05) for s in range(300)]
    >>> [a for s, x in enumerate(healthy) for a in d.update(MetricEvent("r", s, {"loss": x}))]
    []
    >>> diverging = [0.35 * 1.03 ** s + rng.gauss(0, 0.05) for s in range(120)]
    >>> [(a.severity, a.step) for s, x in enumerate(diverging, 300) for a in d.update(MetricEvent("r", s, {"loss": x}))]
    [('medium', 314), ('high', 323), ('critical', 373)]
    """

    name = "loss_divergence"
    state_fields = _SmoothedLoss.state_fields + ("best", "start", "run_length")

    def reset(self) -> None:
        super().reset()
        self.best: float | None = None
        self.start: float | None = None
        self.run_length = 0

    def update(self, event: MetricEvent) -> list[Alert]:
        if self._observe(event) is None:
            return []
        if self.seen == 1:
            self.start = self.smooth
        if self.seen < self.warmup:
            return []
        self.best = self.smooth if self.best is None else min(self.best, self.smooth)
        rise = self.smooth - self.best
        noise = 1.25 * self.absdev
        active = rise > self.divergence_threshold * abs(self.best) and rise > 2 * noise
        self.run_length = self.run_length + 1 if active else 0
        if not active:
            return self._report(event, "convergence_divergence", False)
        if self.run_length >= self.divergence_steps and self.smooth > self.start:
            severity = "critical"
        elif self.run_length >= self.divergence_steps:
            severity = "high"
        else:
            severity = "medium"
        return self._report(
            event, "convergence_divergence", True, severity=severity, value=self.smooth,
            threshold=self.best * (1 + self.divergence_threshold),
            message=(f"smoothed {self.metric} {self.smooth:.4g} is {rise / abs(self.best or 1):.0%} above its "
                     f"best {self.best:.4g} for {self.run_length} step(s)"),
            metadata={"best": self.best, "start": self.start, "consecutive": self.run_length})


@register_detector
class LossPlateauDetector(_SmoothedLoss):
    """Plateau: no relative improvement above ``plateau_threshold`` in ``plateau_window`` observations.

    A plateau at the end of a run is what convergence looks like, so a plateau is ``low`` (``medium`` after
    4 windows). Stagnation is different: after 4 windows the best smoothed loss is within
    ``stagnation_improvement`` of the loss after warm-up — the run has learned nothing (LR far too small,
    frozen weights, a dead network) — and that is ``high``.

    >>> from detectors.events import MetricEvent
    >>> d = LossPlateauDetector()
    >>> out = [a for s in range(300) for a in d.update(MetricEvent("r", s, {"loss": 2.302 + 0.01 * math.sin(s)}))]
    >>> [(a.severity, a.step, a.metadata["stagnation"]) for a in out]
    [('low', 68, False), ('medium', 218, False), ('high', 219, True)]
    """

    name = "loss_plateau"
    state_fields = _SmoothedLoss.state_fields + ("best", "since_best", "reference")

    def reset(self) -> None:
        super().reset()
        self.best: float | None = None
        self.since_best = 0
        self.reference: float | None = None

    def update(self, event: MetricEvent) -> list[Alert]:
        if self._observe(event) is None:
            return []
        if self.seen < self.warmup:
            return []
        if self.reference is None:
            self.reference = self.best = self.smooth
        if self.smooth < self.best - self.plateau_threshold * abs(self.best):
            self.best, self.since_best = self.smooth, 0
        else:
            self.since_best += 1
        watched = self.seen - self.warmup
        stagnant = (watched >= 4 * self.plateau_window
                    and self.best > self.reference - self.stagnation_improvement * abs(self.reference))
        active = self.since_best >= self.plateau_window
        if not active:
            return self._report(event, "convergence_plateau", False)
        severity = "high" if stagnant else "medium" if self.since_best >= 4 * self.plateau_window else "low"
        what = (f"has not improved {self.stagnation_improvement:.0%} since warm-up in {watched} steps"
                if stagnant else f"has not improved by {self.plateau_threshold:.2%} in {self.since_best} steps")
        return self._report(event, "convergence_plateau", True, severity=severity, value=self.smooth,
                            threshold=self.plateau_threshold,
                            message=f"smoothed {self.metric} {self.smooth:.4g} {what}",
                            metadata={"best": self.best, "since_best": self.since_best, "stagnation": stagnant})


@register_detector
class LossOscillationDetector(Detector):
    """Oscillation: the loss goes up, down, up, down with a large amplitude (an LR too high to settle).

    Over the last ``oscillation_window`` steps, the fraction of consecutive differences that change sign
    (2/3 for independent noise, 1 for a pure zig-zag) must reach 0.85, the lag-1 autocorrelation of the
    losses must be below -0.5 (independent noise sits near 0), and the median step size must be at
    least ``oscillation_amplitude`` of the median loss. ``medium``; ``high`` when it lasts a second full
    window with the autocorrelation below -0.7.

    >>> from detectors.events import MetricEvent
    >>> d = LossOscillationDetector()
    >>> zigzag = [1.0 if s % 2 else 2.5 for s in range(60)]
    >>> [(a.severity, a.step) for s, x in enumerate(zigzag) for a in d.update(MetricEvent("r", s, {"loss": x}))]
    [('medium', 20), ('high', 40)]
    """

    name = "loss_oscillation"
    category = "loss"
    section = "convergence"
    defaults = CONVERGENCE_DEFAULTS
    state_fields = ("recent", "run_length")

    def reset(self) -> None:
        self.recent: list[float] = []
        self.run_length = 0

    def update(self, event: MetricEvent) -> list[Alert]:
        x = event.metrics.get(self.metric)
        if x is None or not math.isfinite(x):
            return []
        push(self.recent, x, self.oscillation_window + 1)
        if len(self.recent) <= self.oscillation_window:
            return []
        values = np.asarray(self.recent)
        diffs = np.diff(values)
        signs = np.sign(diffs)
        flips = float(np.mean(signs[1:] * signs[:-1] < 0))
        level = float(np.median(np.abs(values)))
        amplitude = float(np.median(np.abs(diffs))) / level if level > 0 else 0.0
        # lag-1 autocorrelation of the values: ≈0 for independent minibatch noise (whose differences
        # still flip sign 2/3 of the time), ≈-1 for a real zig-zag
        centred = values - values.mean()
        denom = float(np.dot(centred, centred))
        r1 = float(np.dot(centred[1:], centred[:-1])) / denom if denom > 0 else 0.0
        active = flips >= 0.85 and r1 <= -0.5 and amplitude >= self.oscillation_amplitude
        self.run_length = self.run_length + 1 if active else 0
        if not active:
            return self._report(event, "loss_oscillation", False)
        severity = "high" if self.run_length > self.oscillation_window and r1 <= -0.7 else "medium"
        return self._report(
            event, "loss_oscillation", True, severity=severity, value=amplitude,
            threshold=self.oscillation_amplitude,
            message=(f"{self.metric} zig-zags: {flips:.0%} of the last {self.oscillation_window} steps reverse "
                     f"direction, swinging {amplitude:.0%} of its level"),
            metadata={"sign_flip_fraction": flips, "lag1_autocorrelation": r1, "consecutive": self.run_length})
