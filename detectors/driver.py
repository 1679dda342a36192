"""One driver of a run's detectors, for every place they run: the stream worker, ``lossguard replay``,
the managed-job monitor and the in-process API. Its :class:`RunLedger` classifies each step (new, resumed,
a re-delivery, a late step) and keeps the run's counts; the new and resumed steps go to the run's
:class:`DetectorSuite` (a batch of consecutive steps in one call); every alert gets the ``source`` of the
event that raised it and the run's tags (``metadata.source``, ``metadata.run_tags``) and is counted in the
ledger — so ordering, routes that match on source and tags, and the counts agree on live and replayed runs.

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
from itertools import pairwise
from typing import Any

from .alerts import SEVERITIES, Alert
from .base import DETECTORS, Detector, register_detector
from .events import MetricEvent
from .suite import DetectorSuite

__all__ = ["RunDriver", "RunLedger", "enrich", "load_detectors", "DetectorLoadError", "ENTRY_POINT_GROUP", "DETECTORS_ENV"]

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


#: how many recent steps a run remembers to tell a re-delivery from a late step
RECENT_STEPS = 32
#: the step kinds (:meth:`RunLedger.observe`) that are not fed to the detectors
DROPPED = frozenset({"duplicate", "out_of_order"})


class RunLedger:
    """A run's step order, position, source, tags and counts — the summary every way of running the suite
    keeps (the stream worker's :class:`stream_app.aggregates.RunSummary` adds windows and charts to it).

    Step order, explicitly (at-least-once delivery and checkpoint restores both happen in practice):

    - ``new``: the step is past the last one seen → fed to the detectors.
    - ``resumed``: a step seen before, from a new attempt (the ``attempt`` tag changed), or — for a source
      without attempts — a step that went back while the timestamp moved on → a checkpoint restore; fed
      to the detectors (their windows carry on: the pre-restore history is still the run's baseline).
    - ``same_step``: the last step again, later, from the same attempt (an evaluation reported after its
      step) → fed, counted as an event, not as a resume.
    - ``duplicate``: step and time not past the last ones and the step was seen recently → dropped.
    - ``out_of_order``: a late step older than the last one, never seen → dropped and counted (detector
      windows are sequential; a late step cannot be inserted behind them).

    >>> s = RunLedger("r")
    >>> [s.observe(MetricEvent("r", step, {"loss": 1.0}, ts=ts)) for step, ts in
    ...  [(1, 10.0), (3, 11.0), (3, 11.0), (2, 10.5), (4, 12.0), (2, 13.0)]]
    ['new', 'new', 'duplicate', 'out_of_order', 'new', 'resumed']
    >>> s.events, s.duplicates, s.out_of_order, s.resumes, s.last_step
    (4, 1, 1, 1, 2)
    """

    _FIELDS = ("run_id", "source", "tags", "first_ts", "last_ts", "last_step", "events", "duplicates",
               "out_of_order", "resumes", "alerts", "recent_steps")

    def __init__(self, run_id: str = ""):
        self.run_id = run_id
        self.source = ""
        self.tags: dict[str, str] = {}
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self.last_step: int | None = None
        self.events = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.resumes = 0
        #: firing alerts by severity
        self.alerts = dict.fromkeys(SEVERITIES, 0)
        self.recent_steps: list[int] = []

    def observe(self, event: MetricEvent) -> str:
        """Classify ``event`` (see the class docstring) and, unless dropped, take it into the run."""
        if self.last_step is not None and event.step <= self.last_step:
            attempt = event.tags.get("attempt") if event.tags else None
            last_attempt = self.tags.get("attempt")
            if attempt is not None and last_attempt is not None and attempt != last_attempt:
                kind = "resumed"
                self.resumes += 1
            elif event.step == self.last_step and event.ts > self.last_ts and attempt is not None:
                kind = "same_step"
            elif event.ts > self.last_ts:
                kind = "resumed"
                self.resumes += 1
            elif event.step in self.recent_steps:
                self.duplicates += 1
                return "duplicate"
            else:
                self.out_of_order += 1
                return "out_of_order"
        else:
            kind = "new"
        self._accept([event])
        return kind

    def observe_new(self, events: list[MetricEvent]) -> bool:
        """:meth:`observe` for every event of a record known to be ``new``, in one pass: steps past the
        last one seen, in time order, from one source with one set of tags (what a producer's batch is).
        False, with nothing changed, for any other record."""
        first = events[0]
        if ((self.last_step is not None and first.step <= self.last_step)
                or any(b.step <= a.step or b.ts < a.ts or b.source != a.source or b.tags is not a.tags
                       and b.tags != a.tags for a, b in pairwise(events))):
            return False
        self._accept(events)
        return True

    def _accept(self, events: list[MetricEvent]) -> None:
        """Take consecutive accepted ``events`` into the run's position, source, tags and recent steps
        (a subclass adds its own aggregates)."""
        first, last = events[0], events[-1]
        self.events += len(events)
        self.last_step, self.last_ts = last.step, last.ts
        if self.first_ts is None:
            self.first_ts = first.ts
        self.source = last.source
        if last.tags and last.tags != self.tags:  # a copy, replaced (never changed in place) on a change
            self.tags = dict(last.tags)
        recent = self.recent_steps
        if len(events) == 1:
            recent.append(first.step)
        else:
            recent.extend(e.step for e in events)
        del recent[:-RECENT_STEPS]

    def count_alert(self, alert: Alert) -> None:
        if alert.status == "firing":
            self.alerts[alert.severity] += 1

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._FIELDS}

    def load_dict(self, state: Mapping[str, Any]) -> None:
        for name in self._FIELDS:
            if name in state:
                setattr(self, name, state[name])


class RunDriver:
    """A run's :class:`DetectorSuite` and its :class:`RunLedger`, fed event batches: the ledger says which
    steps reach the detectors (re-deliveries and late steps do not), the alerts get the source and tags
    of the event that raised them and are counted in the ledger.

    >>> d = RunDriver()
    >>> late = [MetricEvent("r", s, {"loss": 1.0}, ts=float(s)) for s in (1, 2, 2, 0)]
    >>> d.feed(late), (d.ledger.events, d.ledger.duplicates, d.ledger.out_of_order)
    ([], (2, 1, 1))
    """

    def __init__(self, suite: DetectorSuite | None = None, config: Mapping[str, Any] | None = None,
                 ledger: RunLedger | None = None):
        self.suite = suite if suite is not None else DetectorSuite(config)
        self.ledger = ledger if ledger is not None else RunLedger()

    def feed(self, events: Sequence[MetricEvent]) -> list[Alert]:
        """The alerts ``events`` (steps of one run, in the order they came) raise, enriched and counted."""
        if not events:
            return []
        events = events if isinstance(events, list) else list(events)
        ledger = self.ledger
        #: (step, ts) → the event's source and the run's tags as of that event (unneeded when the steps are
        #: all new with one source and tags: the run's are theirs)
        context: dict[tuple[int, float], tuple[str, dict[str, str]]] | None = None
        if ledger.observe_new(events):
            fed = events
        else:
            fed, context = [], {}
            for event in events:
                if ledger.observe(event) in DROPPED:
                    continue
                fed.append(event)
                context[event.step, event.ts] = (ledger.source, ledger.tags)
            if not fed:
                return []
        alerts = self.suite.update_batch(fed)
        for alert in alerts:
            source, tags = context.get((alert.step, alert.ts), (ledger.source, ledger.tags)) if context else (
                ledger.source, ledger.tags)
            enrich((alert,), source, tags)
            ledger.count_alert(alert)
        return alerts

    def tick(self, now: float) -> list[Alert]:
        """Time-based checks (a run gone silent), enriched with the run's source and tags, and counted
        with the run's other alerts."""
        alerts = self.suite.tick(now)
        enrich(alerts, self.ledger.source, self.ledger.tags)
        for alert in alerts:
            self.ledger.count_alert(alert)
        return alerts

    def state_dict(self) -> dict[str, Any]:
        return {**self.suite.state_dict(), "ledger": self.ledger.to_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.suite.load_state_dict(state)
        self.ledger.load_dict(state.get("ledger", {}))
