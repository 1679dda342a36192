"""The detector protocol, its registry, and the alert-episode bookkeeping every detector shares.

A detector is a small object with one verb, ``update(event) -> list[Alert]``, whose per-run state is a
handful of plain attributes named in ``state_fields``; ``state_dict()`` / ``load_state_dict()`` turn that
state into JSON-able data and back, so the same detector runs in-process and inside a Faust table.

``update_batch(events)`` feeds several consecutive events of the run at once; by default it loops over
``update``, and the heavy detectors override it with a screen that proves cheaply that no event of the
batch can raise anything (then they update their state in bulk) and fall back to the loop otherwise.
Either way the alerts and the state afterwards are exactly those of ``update`` called event by event.

One problem gives one alert: ``_report`` opens an *episode* when a condition first holds (a ``firing``
alert), re-fires only when the severity rises (escalation), and closes the episode with a ``resolved``
alert once the condition has been clear for ``resolve_after`` consecutive observations.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from .alerts import Alert, severity_rank
from .events import MetricEvent
from .stats import compact

__all__ = ["Detector", "DETECTORS", "SPARSE_INTERVAL", "Steps", "all_finite", "cadence", "column", "compacted",
           "has_any", "is_sparse", "last_finite", "may_have", "register_detector"]

#: name → detector class; the stream app and the in-process API build detectors from here.
DETECTORS: dict[str, type[Detector]] = {}


def register_detector(cls: type[Detector]) -> type[Detector]:
    """Class decorator: make a detector available by its ``name`` (also for users' own detectors)."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a class attribute 'name'")
    DETECTORS[cls.name] = cls
    return cls


class Steps(list):
    """Consecutive events of one run, as the suite hands them to ``update_batch``, with each metric's
    column (:func:`column`) built once and shared by every detector that reads it."""

    __slots__ = ("columns", "names")

    def __init__(self, events: list[MetricEvent], names: tuple[str, ...] | None = None):
        super().__init__(events)
        self.columns: dict[str, list[float | None]] = {}
        #: the metric names, when every event has the same ones (None: they vary or nobody looked)
        self.names = names


def column(events: list[MetricEvent], name: str) -> list[float | None]:
    """The values of metric ``name`` over ``events``, None where an event lacks it.

    >>> column([MetricEvent("r", 1, {"loss": 2.0}), MetricEvent("r", 2, {})], "loss")
    [2.0, None]
    """
    columns = getattr(events, "columns", None)
    if columns is None:
        return [e.metrics.get(name) for e in events]
    values = columns.get(name)
    if values is None:
        names = events.names
        if names is not None and name in names and names[0] not in columns:
            # every event has these metrics in this order: all the columns at once, transposed in C
            columns.update(zip(names, map(list, zip(*[e.metrics.values() for e in events], strict=True)), strict=True))
            return columns[name]
        values = columns[name] = [e.metrics.get(name) for e in events]
    return values


def compacted(events: list[MetricEvent], name: str) -> list[float | None]:
    """:func:`column` with each value as a window keeps it (:func:`~detectors.stats.compact`), shared
    by the detectors that put the same metric into their windows."""
    columns = getattr(events, "columns", None)
    key = name + "\0compacted"
    values = None if columns is None else columns.get(key)
    if values is None:
        values = [None if x is None else compact(x) for x in column(events, name)]
        if columns is not None:
            columns[key] = values
    return values


def may_have(events: list[MetricEvent], name: str) -> bool:
    """False when ``events`` are known (``Steps.names``) to have no metric ``name``: its column is all None."""
    known = getattr(events, "names", None)
    return known is None or name in known


def all_finite(values: list[float | None]) -> bool:
    """Whether ``values`` is not empty and all finite numbers (no None, NaN or inf), in C: one containment
    test and one sum (a sum that overflows says no, which only sends a caller to its slower exact path)."""
    return bool(values) and None not in values and math.isfinite(sum(values))


def last_finite(values: list[float | None], k: int, positive: bool = False) -> list[float]:
    """The last ``k`` finite values of ``values`` (only those > 0 with ``positive``), in order."""
    tail = values[-k:]
    if all_finite(tail) and (not positive or min(tail) > 0):
        return tail
    kept = [x for x in values if x is not None and math.isfinite(x) and (x > 0 or not positive)]
    return kept[-k:]


#: a run that logs a point every this many steps or more is *sparse*: each point is usually an average over
#: its interval (HF's ``logging_steps``), less noisy than a step's loss, and a run has tens to hundreds of
#: them, not thousands — warm-ups, windows and persistence counted in points shrink
SPARSE_INTERVAL = 5


def is_sparse(interval: int | None) -> bool:
    """Whether a metric logged every ``interval`` steps (None: not known yet) is sparse."""
    return interval is not None and interval >= SPARSE_INTERVAL


def cadence(first_step: int | None, interval: int | None, step: int) -> tuple[int, int | None]:
    """``(first step, interval)`` of a metric once it is logged at ``step``: the steps between its first two
    values are its logging cadence."""
    if first_step is None:
        return step, interval
    if interval is None and step > first_step:
        return first_step, step - first_step
    return first_step, interval


def has_any(events: list[MetricEvent], names: tuple[str, ...]) -> bool:
    """Whether some event of ``events`` has one of the metrics ``names``."""
    known = getattr(events, "names", None)
    if known is not None:
        return any(name in known for name in names)
    return any(name in e.metrics for e in events for name in names)


class Detector:
    #: registry key, and the ``detector`` field of its alerts
    name: ClassVar[str] = ""
    #: the alert category (gradient, learning_rate, loss, reward_drift, ...)
    category: ClassVar[str] = ""
    #: the config section its parameters live in
    section: ClassVar[str] = ""
    #: parameter name → default; the config file may override each under ``[section]``
    defaults: ClassVar[dict[str, Any]] = {}
    #: attributes that make up the per-run state: numbers, None, lists of numbers, dicts of those
    state_fields: ClassVar[tuple[str, ...]] = ()
    #: the canonical metrics it reads; an event with none of them leaves it untouched, so the suite does
    #: not call it. None: every event matters (it reads all metrics, the clock, or counts events)
    metrics: tuple[str, ...] | None = None

    def __init__(self, **params: Any):
        unknown = set(params) - set(self.defaults) - {"resolve_after"}
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown parameter(s) {sorted(unknown)}")
        for key, default in self.defaults.items():
            setattr(self, key, params.get(key, default))
        self.resolve_after = int(params.get("resolve_after", self.defaults.get("resolve_after", 20)))
        self.episodes: dict[str, dict[str, Any]] = {}
        self.reset()

    def reads(self, names: tuple[str, ...]) -> bool:
        """Whether an event with these metric names matters to this detector (the suite skips it if not).
        ``metrics`` answers it; a detector whose metrics have no fixed names overrides this."""
        return self.metrics is None or any(name in names for name in self.metrics)

    def reset(self) -> None:
        """Set the initial per-run state (the attributes named in ``state_fields``)."""

    def update(self, event: MetricEvent) -> list[Alert]:
        raise NotImplementedError

    def update_batch(self, events: list[MetricEvent]) -> list[tuple[int, Alert]]:
        """``update`` over consecutive events; each alert comes with the index of the event that raised it."""
        return [(i, alert) for i, event in enumerate(events) for alert in self.update(event)]

    def tick(self, now: float) -> list[Alert]:
        """Called periodically with the wall clock (unix seconds); only time-based detectors use it."""
        return []

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # _copy inlined for the usual kinds: most fields are numbers, and a call for each was a third of
        # the worker's cost of saving a run (24 detectors, ~165 fields)
        state = {}
        for name in self.state_fields:
            value = getattr(self, name)
            kind = type(value)
            state[name] = value.copy() if kind is list else _copy(value) if kind is dict else value
        state["episodes"] = _copy(self.episodes) if self.episodes else {}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        for name in self.state_fields:
            if name in state:
                setattr(self, name, _copy(state[name]))
        self.episodes = _copy(state.get("episodes", {}))

    # -- alert episodes ----------------------------------------------------------------------------------
    def _report(self, event: MetricEvent, alert_type: str, active: bool, *, severity: str = "high",
                message: str = "", value: float | None = None, threshold: float | None = None,
                metadata: dict[str, Any] | None = None, resolved_message: str | None = None,
                key: str | None = None) -> list[Alert]:
        """Turn a per-step condition into episode alerts: fire once, escalate, resolve when clear.

        ``key`` names the episode when one alert type has several at once (one per metric, say); it
        defaults to the alert type and, when given, goes into the alert id too."""
        key = key or alert_type
        episode = self.episodes.get(key)
        if active:
            if episode is None:
                self.episodes[key] = {"start": event.step, "severity": severity, "clear": 0,
                                      "message": message, "value": value, "threshold": threshold}
                return [self._alert(event, alert_type, severity, message, value, threshold, metadata,
                                    event.step, key)]
            episode["clear"] = 0
            if severity_rank(severity) > severity_rank(episode["severity"]):
                episode["severity"] = severity
                meta = dict(metadata or {}, escalated=True)
                return [self._alert(event, alert_type, severity, message, value, threshold, meta,
                                    episode["start"], key)]
            return []
        if episode is not None:
            episode["clear"] += 1
            if episode["clear"] >= self.resolve_after:
                del self.episodes[key]
                fired = self._alert(event, alert_type, episode["severity"], episode["message"],
                                    episode["value"], episode["threshold"], None, episode["start"], key)
                text = resolved_message or f"{alert_type} cleared after {event.step - episode['start']} steps"
                return [fired.resolved(event.step, text, ts=event.ts)]
        return []

    def _alert(self, event: MetricEvent, alert_type: str, severity: str, message: str, value: float | None,
               threshold: float | None, metadata: dict[str, Any] | None, episode_step: int,
               key: str | None = None) -> Alert:
        return Alert.new(run_id=event.run_id, step=event.step, ts=event.ts, detector=self.name,
                         category=self.category, alert_type=alert_type, severity=severity, message=message,
                         value=value, threshold=threshold, metadata=metadata, episode_step=episode_step,
                         episode_key=None if key == alert_type else key)


def _copy(value: Any) -> Any:
    """A copy of state data (see ``state_fields``) that shares nothing mutable, without ``deepcopy``'s cost."""
    if type(value) is dict:
        return {k: _copy(v) for k, v in value.items()}
    if type(value) is list:
        return value.copy()
    return value
