"""A run's detectors together: one object per run, one ``update`` per event, one serializable state.

The suite canonicalizes metric names, drops events it has already seen (at-least-once delivery
re-sends them with the same step and timestamp), and fans the event out to every enabled detector.
Its ``state_dict()`` is what the stream app keeps per run in a changelog-backed table.

>>> from detectors.events import MetricEvent
>>> suite = DetectorSuite()
>>> [a.alert_type for a in suite.update(MetricEvent("r", 1, {"train/loss": float("inf")}, ts=1.0))]
['nonfinite_metric']
>>> suite.update(MetricEvent("r", 1, {"train/loss": float("inf")}, ts=1.0))   # duplicate delivery
[]
>>> restored = DetectorSuite(); restored.load_state_dict(suite.state_dict())
>>> restored.state_dict() == suite.state_dict()
True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from .alerts import Alert
from .aliases import canonical_metrics
from .base import DETECTORS, Detector
from .config import DETECTORS_SECTION, build_config
from .events import MetricEvent

__all__ = ["DetectorSuite"]


class DetectorSuite:
    """All enabled detectors for one run."""

    def __init__(self, config: Mapping[str, Any] | None = None, detectors: Iterable[str] | None = None):
        self.config = build_config(config)
        disabled = set(self.config[DETECTORS_SECTION]["disabled"])
        names = list(detectors) if detectors is not None else [n for n in DETECTORS if n not in disabled]
        self.detectors: dict[str, Detector] = {}
        for name in names:
            cls = DETECTORS[name]
            section = self.config[cls.section]
            self.detectors[name] = cls(**{k: section[k] for k in cls.defaults})
        self.last_step: int | None = None
        self.last_ts: float | None = None
        self.events_seen = 0

    def update(self, event: MetricEvent) -> list[Alert]:
        if self.last_step is not None and event.step <= self.last_step and event.ts <= self.last_ts:
            return []  # a re-delivery of an event already processed
        self.last_step, self.last_ts = event.step, event.ts
        self.events_seen += 1
        event = replace(event, metrics=canonical_metrics(event.metrics))
        alerts: list[Alert] = []
        for detector in self.detectors.values():
            alerts.extend(detector.update(event))
        return alerts

    def tick(self, now: float) -> list[Alert]:
        """Time-based checks (a run that went silent); the stream app calls this periodically."""
        alerts: list[Alert] = []
        for detector in self.detectors.values():
            alerts.extend(detector.tick(now))
        return alerts

    #: the name the stream app's timer uses; same thing as :meth:`tick`
    check_stalled = tick

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self.last_step,
            "last_ts": self.last_ts,
            "events_seen": self.events_seen,
            "detectors": {name: d.state_dict() for name, d in self.detectors.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last_step = state.get("last_step")
        self.last_ts = state.get("last_ts")
        self.events_seen = state.get("events_seen", 0)
        for name, det_state in state.get("detectors", {}).items():
            if name in self.detectors:
                self.detectors[name].load_state_dict(det_state)
