"""The auto-stop sink: stop a run when routing sends it a firing alert — once per run.

The stopping itself is pluggable: ``stopper`` is a callable taking a
:class:`~detectors.ControlEvent`. The default writes the event to ``<prefix>.control`` keyed by run id,
where the producer inside a self-hosted job reads it. For managed jobs give ``stopper =
"module:attr"``: a callable, or a class whose instances have ``stop(run_id, reason)`` (e.g.
``producers.managed:JobStopper``). Routing decides which auto-stop sink (and so which stopper) a run
gets — e.g. by ``source`` or run tags.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from detectors import Alert, ControlEvent
from producers.kafka_security import client_config

from . import Sink

__all__ = ["AutoStopSink", "ControlTopicStopper", "Stopper", "load_stopper"]

#: what stops a run; raising means "not stopped yet" and the runner retries
Stopper = Callable[[ControlEvent], object]


class ControlTopicStopper:
    """Writes the control event to the control topic, keyed by run id, and waits for the broker's ack."""

    def __init__(self, bootstrap: str, topic: str):
        from kafka import KafkaProducer

        self.topic = topic
        self.producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), **client_config(), acks="all")

    def __call__(self, event: ControlEvent) -> None:
        self.producer.send(self.topic, key=event.run_id.encode(), value=event.to_json()).get(timeout=10)

    def close(self) -> None:
        self.producer.close()


def load_stopper(spec: str) -> Stopper:
    """``module:attr`` → a stopper; a class is instantiated and its ``stop(run_id, reason)`` used."""
    module, _, attr = spec.partition(":")
    target: Any = getattr(importlib.import_module(module), attr)
    if isinstance(target, type):
        instance = target()
        return lambda event: instance.stop(event.run_id, event.reason)
    return target


class AutoStopSink(Sink):
    paging = True

    def __init__(self, stopper: str | Stopper | None = None, bootstrap: str = "", settings: Any = None,
                 **_context: Any):
        if stopper is None:
            stopper = ControlTopicStopper(bootstrap, settings.topic("control"))
        elif isinstance(stopper, str):
            stopper = load_stopper(stopper)
        self.stopper = stopper
        self.stopped: set[str] = set()

    def deliver(self, alert: Alert, reason: str) -> None:
        if alert.status != "firing" or alert.run_id in self.stopped:
            return
        event = ControlEvent(run_id=alert.run_id, action="stop", alert_id=alert.alert_id,
                             reason=f"{alert.severity} {alert.alert_type} at step {alert.step}: {alert.message}")
        self.stopper(event)
        self.stopped.add(alert.run_id)

    def close(self) -> None:
        close = getattr(self.stopper, "close", None)
        if close:
            close()
