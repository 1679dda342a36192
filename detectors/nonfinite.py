"""Non-finite metrics: a NaN or ±Inf in any metric is an alert at the very step it appears.

Keras' ``TerminateOnNaN`` checks only the loss; here every metric counts (a NaN grad norm often comes a
step before the NaN loss). A non-finite loss (or validation loss, perplexity) is ``critical``. A
non-finite grad norm while the loss stays finite is ``high`` — unless the run logs a ``loss_scale`` above 1,
where it is most likely a step the mixed-precision loss scaler skipped, and ``medium``; a scale of 1 is no
scaler at work (Megatron logs 1.0 under bf16) or one at its floor, with nothing left to skip to. A loss of
exactly 0 beside it is no comfort (fp16 overflow logs that), so that is ``critical``.

A loss that sits exactly at a framework's clamp is non-finite in disguise: 87.3365 is −ln(FLT_MIN), where a
float32 softmax loss (Caffe's, and any that clamps the probability at the smallest normal float) lands when
the right class's probability underflowed; 16.1181 is −ln(1e-7), Keras' clip. A mean loss there means every
sample saturated: the logits have blown up. That is ``high`` (``saturated_loss``), ``critical`` when it
holds for two points.

The metrics that turn non-finite at one step form one episode; a metric that turns non-finite later
opens an episode of its own — it is never swallowed by the one already open. An episode resolves once
its metrics, where logged, have been finite for ``resolve_after`` observations in a row.

>>> from detectors.events import MetricEvent
>>> d = NonFiniteDetector()
>>> d.update(MetricEvent("r", 1, {"loss": 2.0}))
[]
>>> [a.severity for a in d.update(MetricEvent("r", 2, {"loss": float("nan")}))]
['critical']
>>> d = NonFiniteDetector()
>>> [(a.severity, a.step) for s, (loss, g) in enumerate([(2.0, 1.0), (2.1, float("inf")), (2.0, float("inf")),
...  (float("nan"), float("nan"))]) for a in d.update(MetricEvent("r", s, {"loss": loss, "grad_norm": g}))]
[('high', 1), ('critical', 3)]
>>> d = NonFiniteDetector()   # a Caffe solver log: "Iteration 100, loss = 87.3365"
>>> [(a.alert_type, a.severity, a.step) for s, x in enumerate([2.3, 87.3365, 87.3365, 2.2], 99)
...  for a in d.update(MetricEvent("r", s, {"loss": x}))]
[('saturated_loss', 'high', 100), ('saturated_loss', 'critical', 101)]
"""

from __future__ import annotations

import math

from .alerts import Alert
from .base import Detector, all_finite, column, may_have, register_detector
from .events import MetricEvent

__all__ = ["NonFiniteDetector"]

#: metrics whose non-finite value means the model itself is broken
_LOSSES = ("loss", "val_loss", "perplexity")
#: (value, what clamps there) of a loss whose every sample saturated; printed logs round to 4–6 digits
_SATURATED = ((87.3365447505531, "−ln(FLT_MIN): the float32 probability of the right class underflowed"),
              (16.11809565095832, "−ln(1e-7): Keras' clip, every prediction confidently wrong"))
_SATURATED_TOLERANCE = 1e-4


def _saturation(x: float | None) -> str | None:
    """What clamps a loss of ``x`` there, when it sits at a clamp (None: it does not)."""
    if x is None or not 16.1 < x < 87.4:  # both clamps inside: one comparison for almost every loss
        return None
    return next((why for value, why in _SATURATED if abs(x - value) <= _SATURATED_TOLERANCE), None)


def _saturates(xs: list[float | None]) -> bool:
    """Whether any of ``xs`` sits at a clamp: checked in C when they are all finite and all on one side of
    both clamps (almost every batch of losses), else value by value."""
    if all_finite(xs) and (max(xs) <= 16.1 or min(xs) >= 87.4):
        return False
    return any(map(_saturation, xs))


@register_detector
class NonFiniteDetector(Detector):
    name = "nonfinite"
    category = "numerics"
    section = "nonfinite"
    defaults = {"resolve_after": 20}
    state_fields = ("same",)

    def update(self, event: MetricEvent) -> list[Alert]:
        metrics = event.metrics
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        open_metrics = {m for key in self.episodes for m in key.split(",")}
        alerts = self._saturated(event)
        for key in list(self.episodes):  # the episodes already open: still broken, or one more clear step
            if key.startswith("saturated:"):
                continue
            names = key.split(",")
            if any(m in metrics for m in names):
                alerts += self._report(event, "nonfinite_metric", any(m in bad for m in names), key=key,
                                       severity=self.episodes[key]["severity"])
        new = [m for m in bad if m not in open_metrics]
        if new:
            loss = metrics.get("loss")
            if any(m in _LOSSES for m in new) or loss == 0.0:
                severity = "critical"
            elif metrics.get("loss_scale", 0.0) > 1.0:
                severity = "medium"
            else:
                severity = "high"
            names = ", ".join(f"{k}={metrics[k]}" for k in new)
            scaler = " (the run logs a loss scale: likely a step the mixed-precision scaler skipped)" \
                if severity == "medium" else ""
            alerts += self._report(event, "nonfinite_metric", True, severity=severity, key=",".join(new),
                                   message=f"non-finite metric at step {event.step}: {names}{scaler}",
                                   value=metrics[new[0]], metadata={"metrics": new})
        return alerts

    def _saturated(self, event: MetricEvent) -> list[Alert]:
        alerts = []
        for name in ("loss", "val_loss"):
            key, x = f"saturated:{name}", event.metrics.get(name)
            why = _saturation(x)
            if x is None or why is None and key not in self.episodes:
                continue
            self.same[name] = self.same.get(name, 0) + 1 if why else 0
            alerts += self._report(
                event, "saturated_loss", why is not None, key=key,
                severity="critical" if self.same[name] >= 2 else "high", value=x, threshold=None,
                message=f"{name} {x:.6g} sits at {why}: the model's outputs have blown up" if why else "",
                metadata={"metric": name, "points": self.same[name]})
        return alerts

    def reset(self) -> None:
        #: points in a row at a saturated value, by loss name
        self.same: dict[str, int] = {}

    def update_batch(self, events: list[MetricEvent]) -> list[tuple[int, Alert]]:
        # a sum of numbers is finite only if each one is (a finite sum that overflows takes the long way)
        if self.episodes or not math.isfinite(sum(sum(e.metrics.values()) for e in events)) or any(
                map(_saturates, (column(events, name) for name in ("loss", "val_loss") if may_have(events, name)))):
            return super().update_batch(events)
        return []
