"""Loss detectors.

``LossSpikeDetector`` compares each loss with the median of the last ``window`` healthy losses, scaled
by their median absolute deviation (MAD, a robust σ: 1.4826·MAD estimates σ for Gaussian noise, and a
few outliers cannot inflate it the way they inflate a standard deviation). A step is a spike when it is
more than ``threshold`` robust σ *and* ``min_rel_increase`` (relative) above the median. Spikes do not
enter the window, so a burst cannot raise its own baseline. Severity grows with persistence and size: a
lone hard-batch blip stays ``medium``; ``high`` after ``persist_high`` spiking steps in a row or a
jump of ``ratio_high``×; ``critical`` after ``persist_critical`` steps or ``ratio_critical``× sustained.

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

__all__ = ["LossSpikeDetector"]


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
        "ratio_high": 4.0,
        "ratio_critical": 10.0,
        "persist_high": 2,
        "persist_critical": 3,
        "resolve_after": 20,
    }
    state_fields = ("history", "run_length")

    def reset(self) -> None:
        self.history: list[float] = []
        self.run_length = 0

    def update(self, event: MetricEvent) -> list[Alert]:
        x = event.metrics.get(self.metric)
        if x is None or not math.isfinite(x):
            return []
        if len(self.history) < self.warmup:
            self._remember(x)
            return []
        window = np.asarray(self.history)
        median = float(np.median(window))
        sigma = 1.4826 * float(np.median(np.abs(window - median)))
        floor = abs(median) * self.min_rel_increase
        limit = median + max(self.threshold * sigma, floor)
        if x <= limit:
            self.run_length = 0
            self._remember(x)
            return self._report(event, "loss_spike", False)
        self.run_length += 1
        ratio = x / median if median > 0 else math.inf
        if self.run_length >= self.persist_critical or (ratio >= self.ratio_critical and self.run_length > 1):
            severity = "critical"
        elif self.run_length >= self.persist_high or ratio >= self.ratio_high * 2:
            severity = "high"
        else:
            severity = "medium"
        z = (x - median) / sigma if sigma > 0 else math.inf
        return self._report(
            event, "loss_spike", True, severity=severity, value=x, threshold=limit,
            message=(f"{self.metric} {x:.4g} is {ratio:.2f}x its recent median {median:.4g} "
                     f"({z:.1f} robust sigma) for {self.run_length} step(s)"),
            metadata={"median": median, "robust_sigma": sigma, "ratio": ratio, "consecutive": self.run_length},
        )

    def _remember(self, x: float) -> None:
        self.history.append(x)
        if len(self.history) > self.window:
            del self.history[0]
