"""One driver of a run's detectors, for every place they run: the stream worker, ``lossguard replay``,
the managed-job monitor and the in-process API. It feeds a run's events to its :class:`DetectorSuite` in
step order (a batch of consecutive steps in one call; re-deliveries dropped by the suite), and gives every
alert the ``source`` of the event that raised it and the run's tags (``metadata.source``,
``metadata.run_tags``), so routes that match on them behave the same on live and replayed runs.

Users' own detectors load by ``module:Class`` (``--detector`` of ``lossguard worker`` / ``replay``, or
``LOSSGUARD_DETECTORS``, comma-separated) or from the ``lossguard.detectors`` entry-point group of an
installed package; either way they are registered under their ``name`` and run like the built-in ones.

>>> from detectors.events import MetricEvent
>>> driver = RunDriver()
>>> alerts = driver.feed([MetricEvent("r", 1, {"loss": float("nan")}, ts=1.0, source="hf", tags={"team": "a"})])
>>> [(a.alert_type, a.metadata["source"], a.metadata["run_tags"]) for a in alerts]
[('nonfinite_metric', 'hf', {'team': 'a'})]
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .alerts import Alert
from .base import DETECTORS, Detector, register_detector
from .events import MetricEvent
from .suite import DetectorSuite

__all__ = ["RunDriver", "enrich", "load_detectors", "DetectorLoadError", "ENTRY_POINT_GROUP", "DETECTORS_ENV"]

#: the entry-point group an installed package uses to contribute detectors (``name = "pkg.mod:Class"``)
ENTRY_POINT_GROUP = "lossguard.detectors"
#: comma-separated ``module:Class`` detectors to load (what ``--detector`` sets for a worker)
DETECTORS_ENV = "LOSSGUARD_DETECTORS"


class DetectorLoadError(ValueError):
    """A user's detector that cannot be loaded; the message names it."""


def load_detectors(specs: Iterable[str] | str | None = None, *, entry_points: bool = True) -> list[type[Detector]]:
    """Import and register users' detectors: ``module:Class`` specs (a list, or one comma-separated
    string; default ``$LOSSGUARD_DETECTORS``) and, with ``entry_points``, the ``lossguard.detectors``
    group. Returns the classes loaded. One that cannot be loaded raises :class:`DetectorLoadError` naming it."""
    if specs is None:
        specs = os.environ.get(DETECTORS_ENV, "")
    if isinstance(specs, str):
        specs = [s for s in (part.strip() for part in specs.split(",")) if s]
    loaded = [_load_spec(spec) for spec in specs]
    if entry_points:
        from importlib.metadata import entry_points as installed

        for ep in installed(group=ENTRY_POINT_GROUP):
            try:
                loaded.append(_register(ep.load(), f"entry point {ep.name} = {ep.value}"))
            except Exception as exc:  # noqa: BLE001 — name the entry point whatever went wrong
                raise DetectorLoadError(f"detector entry point {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
    return loaded


def _load_spec(spec: str) -> type[Detector]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise DetectorLoadError(f"detector {spec!r}: expected module:Class")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise DetectorLoadError(f"detector {spec!r} cannot be loaded: {exc}") from exc
    return _register(obj, spec)


def _register(obj: Any, what: str) -> type[Detector]:
    if not (isinstance(obj, type) and issubclass(obj, Detector)):
        raise DetectorLoadError(f"detector {what}: {obj!r} is not a Detector subclass")
    if DETECTORS.get(getattr(obj, "name", None)) is not obj:
        register_detector(obj)
    return obj


def enrich(alerts: Iterable[Alert], source: str, tags: Mapping[str, str]) -> None:
    """Mark ``alerts`` with the source and tags of the run as of the event that raised them."""
    for alert in alerts:
        alert.metadata.update(source=source, run_tags=dict(tags))


class RunDriver:
    """A run's :class:`DetectorSuite` and the run's source and tags, fed event batches in step order."""

    def __init__(self, suite: DetectorSuite | None = None, config: Mapping[str, Any] | None = None):
        self.suite = suite if suite is not None else DetectorSuite(config)
        self.source = ""
        self.tags: dict[str, str] = {}

    def feed(self, events: Sequence[MetricEvent]) -> list[Alert]:
        """The alerts ``events`` (consecutive steps of one run, in order) raise, enriched."""
        if not events:
            return []
        events = events if isinstance(events, list) else list(events)
        alerts = self.suite.update_batch(events)
        if alerts:
            context = {(e.step, e.ts): e for e in events} if len(events) > 1 else {}
            for alert in alerts:
                event = context.get((alert.step, alert.ts), events[-1])
                enrich((alert,), event.source or self.source, event.tags or self.tags)
        last = events[-1]
        self.source = last.source or self.source
        if last.tags:
            self.tags = dict(last.tags)
        return alerts

    def tick(self, now: float) -> list[Alert]:
        alerts = self.suite.tick(now)
        enrich(alerts, self.source, self.tags)
        return alerts

    def state_dict(self) -> dict[str, Any]:
        return {**self.suite.state_dict(), "source": self.source, "tags": dict(self.tags)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.suite.load_state_dict(state)
        self.source = state.get("source", "")
        self.tags = dict(state.get("tags", {}))
