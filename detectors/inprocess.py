"""The in-process API: the same detectors, called from the training loop itself, no Kafka.

    >>> import tempfile
    >>> from detectors import AdvancedAnomalyDetector
    >>> out = tempfile.mkdtemp()
    >>> det = AdvancedAnomalyDetector(output_dir=out, gradient={"explosion_threshold": 5.0})
    >>> for step in range(30):
    ...     alerts = det.analyze_training_step(loss=2.0 - step / 100, grad_norm=1.0, lr=1e-3, step=step)
    >>> [(a.alert_type, a.severity) for a in det.analyze_training_step(loss=float("nan"), step=30)]
    [('nonfinite_metric', 'critical')]
    >>> det.get_summary()["by_severity"]
    {'critical': 1}

``model`` and ``optimizer`` (PyTorch) give the gradient norm and learning rate; ``rewards`` are summarised
(mean, std, quantiles) and ``predictions=(probabilities, outcomes)`` become calibration bins and an ECE.

Handlers, two shapes:

- the documented one: ``profiler_registry.register_hook(name, handler)`` with ``handler(alerts, step)``,
  called once per analysed step that raised alerts (``AnomalyDetectionHook(detector).register_with_profiler()``
  puts a hook object there);
- lossguard's own: :func:`register_hook` (or ``hooks=``) with ``handler(alert)``, once per alert.

A handler that raises is logged and skipped, never breaking the training step. What reaches the files, the
summary and the handlers is the list ``analyze_training_step`` returns — a subclass that extends it (the
documented custom-detector pattern) has its own alerts saved and dispatched too. A resolved event is
returned with severity ``low`` (the episode's severity in ``metadata["episode_severity"]``), so a loop
that prints critical/high alerts does not print an episode's end as if it fired again. As documented,
a gradient explosion over ``explosion_threshold`` is critical and a vanishing gradient at least high
(the detector's own grading in ``metadata["detector_severity"]``). Writing the alert JSON files and the
summary report is the only I/O in ``detectors/`` and lives here.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .alerts import Alert, severity_rank
from .base import Detector
from .driver import RunDriver
from .events import MetricEvent
from .suite import DetectorSuite
from .summaries import distribution, prediction_metrics

__all__ = ["AdvancedAnomalyDetector", "AnomalyDetectionHook", "ProfilerRegistry", "profiler_registry",
           "register_hook", "unregister_hook", "HOOKS"]

log = logging.getLogger(__name__)

AlertHandler = Callable[[Alert], Any]
#: name → handler called with every alert of every in-process detector
HOOKS: dict[str, AlertHandler] = {}


def register_hook(name: str, handler: AlertHandler) -> AlertHandler:
    """Call ``handler(alert)`` for every alert raised in-process (e.g. save a checkpoint, page someone)."""
    if not callable(handler):
        raise TypeError(f"hook {name!r} must be callable, got {handler!r}")
    HOOKS[name] = handler
    return handler


def unregister_hook(name: str) -> None:
    HOOKS.pop(name, None)


class ProfilerRegistry:
    """Named handlers of the documented shape ``handler(alerts, step)``, called once per analysed step
    that raised alerts, for every in-process detector (``profiler_registry`` is the one they use).

    >>> calls = []
    >>> registry = ProfilerRegistry()
    >>> _ = registry.register_hook("print", lambda alerts, step: calls.append((len(alerts), step)))
    >>> registry.dispatch([Alert.new(run_id="r", step=3, detector="d", category="c", alert_type="t",
    ...                              severity="high", message="")], 3)
    >>> calls
    [(1, 3)]
    """

    def __init__(self) -> None:
        self.hooks: dict[str, Callable[[list[Alert], int], Any]] = {}
        self.detectors: list[AdvancedAnomalyDetector] = []

    def register_hook(self, name: str, handler: Callable[[list[Alert], int], Any]) -> Callable[..., Any]:
        if not callable(handler):
            raise TypeError(f"hook {name!r} must be callable, got {handler!r}")
        self.hooks[name] = handler
        return handler

    def unregister_hook(self, name: str) -> None:
        self.hooks.pop(name, None)

    def register_detector(self, detector: AdvancedAnomalyDetector) -> None:
        if detector not in self.detectors:
            self.detectors.append(detector)

    def dispatch(self, alerts: list[Alert], step: int) -> None:
        for name, handler in list(self.hooks.items()):
            try:
                handler(alerts, step)
            except Exception:  # noqa: BLE001 — a broken handler must never stop training
                log.exception("anomaly hook %r failed at step %s; training continues", name, step)


#: the registry the documented examples use: ``profiler_registry.register_hook("anomaly_detection", handler)``
profiler_registry = ProfilerRegistry()


class AnomalyDetectionHook:
    """Connects alerts to your code, with a severity filter; subclass and override :meth:`on_alert`, or
    pass ``callback``.

    ``AnomalyDetectionHook(detector).register_with_profiler()`` (the documented form) registers the detector
    and this hook with :data:`profiler_registry`; ``AnomalyDetectionHook(callback)`` is a per-alert handler
    for :func:`register_hook` or ``hooks=``.

    >>> seen = []
    >>> hook = AnomalyDetectionHook(seen.append, min_severity="high")
    >>> hook(Alert.new(run_id="r", step=1, detector="d", category="c", alert_type="t", severity="low", message=""))
    >>> seen
    []
    """

    def __init__(self, target: AdvancedAnomalyDetector | AlertHandler | None = None, min_severity: str = "low",
                 alert_types: Iterable[str] | None = None, *, callback: AlertHandler | None = None):
        self.detector = target if isinstance(target, AdvancedAnomalyDetector) else None
        if self.detector is None and target is not None and not callable(target):
            raise TypeError(f"expected an AdvancedAnomalyDetector or a callable, got {target!r}")
        self.callback = callback if self.detector is not None or callback is not None else target
        self.min_rank = severity_rank(min_severity)
        self.alert_types = set(alert_types) if alert_types is not None else None
        self.alerts: list[Alert] = []  #: what this hook let through, newest last

    def register_with_profiler(self, registry: ProfilerRegistry | None = None,
                               name: str = "anomaly_detection_hook") -> AnomalyDetectionHook:
        """Register this hook (and its detector) with ``registry`` (default :data:`profiler_registry`)."""
        registry = profiler_registry if registry is None else registry
        if self.detector is not None:
            registry.register_detector(self.detector)
        registry.register_hook(name, self.handle)
        return self

    def handle(self, alerts: Sequence[Alert], step: int) -> None:
        """The documented handler shape: every alert of one step."""
        for alert in alerts:
            self(alert)

    def __call__(self, alert: Alert) -> None:
        if alert.rank < self.min_rank or (self.alert_types is not None and alert.alert_type not in self.alert_types):
            return
        self.alerts.append(alert)
        del self.alerts[:-1000]
        self.on_alert(alert)

    def on_alert(self, alert: Alert) -> None:
        if self.callback is not None:
            self.callback(alert)


def _dispatching(analyze: Callable[..., list[Alert]]) -> Callable[..., list[Alert]]:
    """Wrap ``analyze_training_step``: the outermost call saves and dispatches the list it returns, so the
    alerts a subclass adds reach the files, the summary and the handlers."""
    if getattr(analyze, "_lossguard_dispatching", False):
        return analyze

    @functools.wraps(analyze)
    def analyze_training_step(self: AdvancedAnomalyDetector, *args: Any, **kwargs: Any) -> list[Alert]:
        if getattr(self, "_analyzing", False):
            return analyze(self, *args, **kwargs)
        self._analyzing = True
        try:
            alerts = analyze(self, *args, **kwargs)
        finally:
            self._analyzing = False
        self._dispatch(alerts if alerts is not None else [], self._last_step)
        return alerts

    analyze_training_step._lossguard_dispatching = True  # type: ignore[attr-defined]
    return analyze_training_step


def _number(value: Any) -> float:
    """A float from a Python/numpy number or a one-element tensor (``.item()`` without importing torch)."""
    if hasattr(value, "detach"):
        value = value.detach()
    if hasattr(value, "item"):
        value = value.item()
    return float(value)


def _grad_norm(model: Any) -> float | None:
    import torch  # lazily: detectors/ must import without torch

    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [g.norm() for g in grads]
    return float(torch.linalg.vector_norm(torch.stack([n.float() for n in norms])))


def _as_array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=float).ravel()


class AdvancedAnomalyDetector:
    """All registered detectors for one run, fed from the training loop.

    Sections (``gradient``, ``learning_rate``, ``batch_size``, ``convergence``, ``reward_drift`` and every
    other detector section, e.g. ``loss_spike={"threshold": 8}``) override the defaults; unknown keys raise
    :class:`detectors.ConfigError`. ``detectors`` adds custom detectors: registered names, Detector
    classes (built with their defaults) or ready instances.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "analyze_training_step" in cls.__dict__:
            cls.analyze_training_step = _dispatching(cls.__dict__["analyze_training_step"])

    def __init__(self, output_dir: str | os.PathLike | None = "anomaly_detection_results", save_alerts: bool = True,
                 gradient: Mapping[str, Any] | None = None, learning_rate: Mapping[str, Any] | None = None,
                 batch_size: Mapping[str, Any] | None = None, convergence: Mapping[str, Any] | None = None,
                 reward_drift: Mapping[str, Any] | None = None, *, run_id: str = "inprocess",
                 detectors: Iterable[str | type[Detector] | Detector] | None = None,
                 hooks: Mapping[str, AlertHandler] | None = None, **other_sections: Mapping[str, Any]):
        sections = {"gradient": gradient, "learning_rate": learning_rate, "batch_size": batch_size,
                    "convergence": convergence, "reward_drift": reward_drift, **other_sections}
        self.suite = DetectorSuite({k: v for k, v in sections.items() if v is not None})
        self.driver = RunDriver(self.suite)
        for extra in detectors or ():
            self.add_detector(extra)
        self.run_id = run_id
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.save_alerts = save_alerts
        self.hooks: dict[str, AlertHandler] = dict(hooks or {})
        self.alerts: list[Alert] = []
        self.steps_analyzed = 0
        self._next_step = 0
        self._last_step = -1
        self._analyzing = False

    def add_detector(self, detector: str | type[Detector] | Detector) -> Detector:
        """Run one more detector: a registered name, a Detector class, or an instance."""
        from .base import DETECTORS

        if isinstance(detector, str):
            cls = DETECTORS[detector]
            section = self.suite.config.get(cls.section, {})
            instance = cls(**{k: section[k] for k in cls.defaults if k in section})
        elif isinstance(detector, type) and issubclass(detector, Detector):
            instance = detector()
        elif isinstance(detector, Detector):
            instance = detector
        else:
            raise TypeError(f"expected a detector name, class or instance, got {detector!r}")
        self.suite.detectors[instance.name or type(instance).__name__] = instance
        self.suite._routes.clear()  # the suite caches which detectors read which metrics
        return instance

    def analyze_training_step(self, model: Any = None, optimizer: Any = None, loss: Any = None,
                              batch_size: int | None = None, rewards: Any = None,
                              predictions: Any = None, step: int | None = None,
                              **metrics: Any) -> list[Alert]:
        """Check one training step; returns the alerts it raised (also saved and sent to the hooks).

        ``step`` defaults to one more than the last; other keyword arguments are metrics (any name)."""
        values: dict[str, float] = {}
        for name, value in metrics.items():
            try:
                values[name] = _number(value)
            except (TypeError, ValueError):
                log.debug("metric %s=%r is not a number; skipped", name, value)
        if loss is not None:
            values["loss"] = _number(loss)
        if model is not None and "grad_norm" not in values:
            g = _grad_norm(model)
            if g is not None:
                values["grad_norm"] = g
        if optimizer is not None and "lr" not in values:
            values["lr"] = float(optimizer.param_groups[0]["lr"])
        if batch_size is not None:
            values["batch_size"] = float(batch_size)
        if rewards is not None:
            values.update(distribution("reward", _as_array(rewards)))
        if predictions is not None:
            values.update(self._predictions(predictions))
        if step is None:
            step = self._next_step
        self._next_step = step + 1
        self._last_step = int(step)
        event = MetricEvent(run_id=self.run_id, step=int(step), metrics=values, ts=time.time(), source="inprocess")
        alerts = [self._as_documented(a) for a in self.driver.feed([event])]
        self.steps_analyzed += 1
        return alerts

    def _as_documented(self, alert: Alert) -> Alert:
        """The documented grading: resolved events are not graded as firing; explosion over the threshold is
        critical, vanishing at least high."""
        if alert.status == "resolved":
            if alert.severity == "low":
                return alert
            return replace(alert, severity="low", metadata={**alert.metadata, "episode_severity": alert.severity})
        severity = alert.severity
        if (alert.alert_type == "gradient_explosion" and not alert.metadata.get("estimated")
                and alert.value is not None and alert.value > self._explosion_threshold()):
            severity = "critical"
        elif alert.alert_type == "gradient_vanishing" and alert.rank < severity_rank("high"):
            severity = "high"
        if severity == alert.severity:
            return alert
        return replace(alert, severity=severity, metadata={**alert.metadata, "detector_severity": alert.severity})

    def _explosion_threshold(self) -> float:
        return float(self.suite.config.get("gradient", {}).get("explosion_threshold", math.inf))

    def check_stalled(self, now: float | None = None) -> list[Alert]:
        """Time-based checks (a loop that stopped calling in); for a watchdog thread."""
        alerts = [self._as_documented(a) for a in self.driver.tick(time.time() if now is None else now)]
        self._dispatch(alerts, self._last_step)
        return alerts

    @staticmethod
    def _predictions(predictions: Any) -> dict[str, float]:
        if isinstance(predictions, tuple) and len(predictions) == 2:
            probs, outcomes = predictions
            return prediction_metrics(_as_array(probs), _as_array(outcomes))
        return prediction_metrics(_as_array(predictions))

    def _dispatch(self, alerts: Sequence[Alert], step: int) -> None:
        if not alerts:
            return
        for alert in alerts:
            self.alerts.append(alert)
            if self.output_dir is not None and self.save_alerts and isinstance(alert, Alert):
                self.output_dir.mkdir(parents=True, exist_ok=True)
                name = f"alert_{alert.step:08d}_{alert.alert_type}_{alert.status}_{alert.alert_id}.json"
                (self.output_dir / name).write_text(json.dumps(alert.to_dict(), indent=2))
            for name, handler in {**HOOKS, **self.hooks}.items():
                try:
                    handler(alert)
                except Exception:  # noqa: BLE001 — a broken handler must never stop training
                    log.exception("alert hook %r failed on %s; training continues", name, alert.alert_type)
        profiler_registry.dispatch(list(alerts), step)

    def get_summary(self, latest: int = 10) -> dict[str, Any]:
        """Counts of firing alerts by category and severity, and the latest alert events."""
        firing = [a for a in self.alerts if a.status == "firing"]
        return {
            "run_id": self.run_id,
            "steps_analyzed": self.steps_analyzed,
            "total_alerts": len(firing),
            "resolved_alerts": len(self.alerts) - len(firing),
            "by_category": dict(Counter(a.category for a in firing)),
            "by_severity": dict(Counter(a.severity for a in firing)),
            "by_type": dict(Counter(a.alert_type for a in firing)),
            "latest_alerts": [a.to_dict() for a in self.alerts[-latest:]],
        }

    def save_report(self, path: str | os.PathLike | None = None) -> Path:
        """Write :meth:`get_summary` as JSON (default ``output_dir/anomaly_report.json``)."""
        if path is None:
            if self.output_dir is None:
                raise ValueError("no path given and no output_dir set")
            path = self.output_dir / "anomaly_report.json"
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.get_summary(latest=50), indent=2, allow_nan=False))
        return target

    def state_dict(self) -> dict[str, Any]:
        return {"suite": self.driver.state_dict(), "next_step": self._next_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.driver.load_state_dict(state["suite"])
        self._next_step = state.get("next_step", 0)




AdvancedAnomalyDetector.analyze_training_step = _dispatching(AdvancedAnomalyDetector.analyze_training_step)
