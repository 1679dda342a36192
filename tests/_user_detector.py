"""A user's own detector, loaded by ``module:Class`` in the worker and replay tests (not registered here:
the loader registers it)."""

from __future__ import annotations

from detectors import Alert, Detector, MetricEvent


class LossAboveTen(Detector):
    name = "user_loss_above_ten"
    category = "custom"
    metrics = ("loss",)

    def update(self, event: MetricEvent) -> list[Alert]:
        loss = event.metrics.get("loss")
        if loss is None:
            return []
        return self._report(event, "loss_above_ten", loss > 10.0, severity="high", message=f"loss {loss} > 10",
                            value=loss, threshold=10.0)
