"""A run's detectors together: one object per run, one ``update`` per event, one serializable state.

The suite canonicalizes metric names, drops events it has already seen (at-least-once delivery
re-sends them with the same step and timestamp), and fans the event out to the enabled detectors that
read one of its metrics. ``update_batch`` takes several consecutive events of the run (a batched record)
and hands each detector its events in one call; alerts come in the order ``update`` would give them.
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
>>> [(a.step, a.status) for a in suite.update_batch([MetricEvent("r", s, {"loss": 2.0 - s / 100}, ts=float(s)) for s in range(2, 40)])]
[(21, 'resolved')]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from functools import lru_cache
from operator import attrgetter, lt
from typing import Any

from .alerts import Alert
from .aliases import canonical_metrics, canonical_name
from .base import DETECTORS, Detector, Steps
from .config import DETECTORS_SECTION, build_config
from .events import MetricEvent

__all__ = ["DetectorSuite", "enabled_detectors"]


class DetectorSuite:
    """All enabled detectors for one run."""

    def __init__(self, config: Mapping[str, Any] | None = None, detectors: Iterable[str] | None = None):
        self._setup(*_plan(build_config(config), detectors))

    @classmethod
    def factory(cls, config: Mapping[str, Any] | None = None,
                detectors: Iterable[str] | None = None) -> Callable[[], DetectorSuite]:
        """A maker of fresh suites equal to ``DetectorSuite(config, detectors)``: the config is validated
        and each detector's parameters are picked once, not per suite (the stream app makes one per run).
        The suites share the validated config dict; nothing writes to it."""
        built = build_config(config)
        plan = _plan(built, detectors)

        def make() -> DetectorSuite:
            suite = cls.__new__(cls)
            suite._setup(*plan)
            return suite

        return make

    def _setup(self, config: dict[str, dict[str, Any]],
               plan: tuple[tuple[str, type[Detector], dict[str, Any]], ...]) -> None:
        self.config = config
        self.detectors: dict[str, Detector] = {name: det_cls(**params) for name, det_cls, params in plan}
        self.last_step: int | None = None
        self.last_ts: float | None = None
        self.events_seen = 0
        self._routes: dict[tuple[str, ...], tuple[tuple[int, Detector], ...]] = {}

    def update(self, event: MetricEvent) -> list[Alert]:
        return self.update_batch([event])

    def update_batch(self, events: Iterable[MetricEvent]) -> list[Alert]:
        """``update`` for consecutive events of the run, each detector called once for all of them."""
        events = events if isinstance(events, list) else list(events)
        steps = list(map(_STEP, events))
        if steps and (self.last_step is None or steps[0] > self.last_step) and all(map(lt, steps, steps[1:])):
            fresh = events  # steps past the last one, in order (a producer's batch): all of them are new
            self.last_step, self.last_ts = steps[-1], events[-1].ts
        else:
            fresh = []
            for event in events:
                if self.last_step is not None and event.step <= self.last_step and event.ts <= self.last_ts:
                    continue  # a re-delivery of an event already processed
                self.last_step, self.last_ts = event.step, event.ts
                fresh.append(event)
        self.events_seen += len(fresh)
        if not fresh:
            return []
        names = list(map(tuple, map(_METRICS, fresh)))
        same = names.count(names[0]) == len(names)
        if not (same and _is_canonical(names[0])):
            fresh = [_canonical(e) for e in fresh]
            names = list(map(tuple, map(_METRICS, fresh)))
            same = names.count(names[0]) == len(names)
        fresh = Steps(fresh, names[0] if same else None)
        raised: list[tuple[int, int, Alert]] = []
        if same:  # every event has the same metrics: only the detectors that read one of them are called
            for rank, detector in self._route(names[0]):
                found = detector.update_batch(fresh)
                if found:
                    raised += [(i, rank, a) for i, a in found]
            if len(fresh) == 1:
                return [alert for _, _, alert in raised]  # one event: already in suite order
        else:
            routes = [{rank for rank, _ in self._route(n)} for n in names]
            for rank, detector in enumerate(self.detectors.values()):
                picked = [i for i, route in enumerate(routes) if rank in route]
                if picked:
                    raised += [(picked[i], rank, a) for i, a in detector.update_batch(Steps([fresh[i] for i in picked]))]
        raised.sort(key=lambda r: r[:2])  # event by event, detectors in suite order, as update() gives them
        return [alert for _, _, alert in raised]

    def _route(self, names: tuple[str, ...]) -> tuple[tuple[int, Detector], ...]:
        """The detectors (with their ranks, in suite order) that read one of the metrics ``names``: decided
        once per name tuple, so an event's metrics cost one lookup, not a test per detector."""
        route = self._routes.get(names)
        if route is None:
            route = self._routes[names] = tuple(
                (rank, d) for rank, d in enumerate(self.detectors.values()) if d.reads(names))
        return route

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


def enabled_detectors(config: Mapping[str, Any] | None = None) -> list[str]:
    """The detectors a config enables (all registered ones but its ``disabled``), in suite order."""
    return _enabled(build_config(config))


def _enabled(config: dict[str, dict[str, Any]]) -> list[str]:
    disabled = set(config[DETECTORS_SECTION]["disabled"])
    return [name for name in DETECTORS if name not in disabled]


def _plan(config: dict[str, dict[str, Any]], detectors: Iterable[str] | None
          ) -> tuple[dict[str, dict[str, Any]], tuple[tuple[str, type[Detector], dict[str, Any]], ...]]:
    """The validated ``config`` and, per detector to run (suite order), its class and parameters."""
    names = list(detectors) if detectors is not None else _enabled(config)
    plan = []
    for name in names:
        cls = DETECTORS[name]
        section = config[cls.section]
        plan.append((name, cls, {k: section[k] for k in cls.defaults}))
    return config, tuple(plan)


_STEP, _METRICS = attrgetter("step"), attrgetter("metrics")


@lru_cache(maxsize=1024)
def _is_canonical(names: tuple[str, ...]) -> bool:
    return all(canonical_name(name) == name for name in names)


def _canonical(event: MetricEvent) -> MetricEvent:
    """The event with canonical metric names (the same object when they already are)."""
    if _is_canonical(tuple(event.metrics)):
        return event
    return replace(event, metrics=canonical_metrics(event.metrics))

