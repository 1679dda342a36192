"""Non-finite metrics: a NaN or ±Inf in any metric is critical at the very step it appears.

Keras' ``TerminateOnNaN`` checks only the loss; here every metric counts (a NaN grad norm often comes a
step before the NaN loss), and the episode resolves once every metric has been finite again for
``resolve_after`` steps.

>>> from detectors.events import MetricEvent
>>> d = NonFiniteDetector()
>>> d.update(MetricEvent("r", 1, {"loss": 2.0}))
[]
>>> [a.severity for a in d.update(MetricEvent("r", 2, {"loss": float("nan")}))]
['critical']
"""

from __future__ import annotations

import math

from .alerts import Alert
from .base import Detector, register_detector
from .events import MetricEvent

__all__ = ["NonFiniteDetector"]


@register_detector
class NonFiniteDetector(Detector):
    name = "nonfinite"
    category = "numerics"
    section = "nonfinite"
    defaults = {"resolve_after": 20}

    def update(self, event: MetricEvent) -> list[Alert]:
        bad = {k: v for k, v in event.metrics.items() if not math.isfinite(v)}
        if not bad:
            return self._report(event, "nonfinite_metric", False)
        names = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        first = next(iter(sorted(bad)))
        return self._report(event, "nonfinite_metric", True, severity="critical",
                            message=f"non-finite metric at step {event.step}: {names}",
                            value=bad[first], metadata={"metrics": sorted(bad)})

    def update_batch(self, events: list[MetricEvent]) -> list[tuple[int, Alert]]:
        # a sum of numbers is finite only if each one is (a finite sum that overflows takes the long way)
        if self.episodes or not math.isfinite(sum(sum(e.metrics.values()) for e in events)):
            return super().update_batch(events)
        return []
