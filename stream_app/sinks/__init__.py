"""Alert sinks: consumers of the alert topic, each in its own consumer group, each with its own policy.

    lossguard.alerts ─► [dedup ─► silences ─► routes ─► policy (group/cooldown)] ─► sink.deliver()
                                                       one pipeline per sink, offsets committed after delivery

A sink is a small object with one verb, ``deliver(alert, reason)``, that raises on failure; the runner
(:mod:`.runner`) retries with backoff and commits an alert's offset only once it is delivered, so an
endpoint that is down delays alerts but loses none. A failure that no retry can mend (an HTTP 4xx other
than 408/429, a file name the file system refuses) is permanent: the alert goes to the sink's dead letters
with the reason and the sink moves on. Kinds: ``console``, ``jsonl``, ``webhook``, ``autostop``,
``alertmanager``; which alerts each gets is decided by :mod:`stream_app.routing`.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, ClassVar

from detectors import Alert
from detectors.config import ConfigError

__all__ = ["Sink", "DeliveryError", "PermanentDeliveryError", "SINK_KINDS", "build_sink", "POLICY_OPTIONS"]

#: per-sink options the runner's policy takes (the rest go to the sink)
POLICY_OPTIONS = ("group_by_run", "cooldown_s")


class DeliveryError(RuntimeError):
    """Delivery failed; the runner retries the same alert with backoff."""


class PermanentDeliveryError(DeliveryError):
    """Delivery failed for a reason no retry mends; the runner dead-letters the alert and moves on."""


class Sink:
    name: str = ""
    #: pagers group by run and cool down by default; record-keeping sinks take every alert
    paging: ClassVar[bool] = False

    def deliver(self, alert: Alert, reason: str) -> None:
        raise NotImplementedError

    def replayed(self, alert: Alert, reason: str) -> None:
        """An alert delivered before this sink (re)started, met again while the runner replays the alert log
        up to its committed offsets: a sink that keeps state about earlier deliveries rebuilds it here,
        without sending anything. Nothing by default."""

    def close(self) -> None:
        """Release what the sink holds (files, clients)."""


#: kind → "module:Class" (imported on use: a console sink needs no HTTP or Kafka producer)
SINK_KINDS = {
    "console": "stream_app.sinks.console:ConsoleSink",
    "jsonl": "stream_app.sinks.jsonl:JsonlSink",
    "webhook": "stream_app.sinks.webhook:WebhookSink",
    "autostop": "stream_app.sinks.autostop:AutoStopSink",
    "alertmanager": "stream_app.sinks.alertmanager:AlertmanagerSink",
}


def build_sink(name: str, options: dict[str, Any], context: dict[str, Any]) -> Sink:
    """Build sink ``name`` of ``options['kind']``; ``context`` holds settings/bootstrap the kinds may use."""
    options = {k: v for k, v in options.items() if k not in POLICY_OPTIONS}
    kind = options.pop("kind", name)
    if kind not in SINK_KINDS:
        raise ConfigError(f"sinks.{name}.kind", f"unknown sink kind {kind!r} (known: {', '.join(SINK_KINDS)})")
    module, cls_name = SINK_KINDS[kind].split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    # a sink swallows the context it does not use (**_context): a misspelt option must not vanish there too
    accepted = {p.name for p in inspect.signature(cls.__init__).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self", *context}
    for option in options:
        if option not in accepted:
            raise ConfigError(f"sinks.{name}.{option}", f"unknown option of a {kind} sink (known: "
                              f"{', '.join(sorted(accepted | {'kind', *POLICY_OPTIONS}))})")
    try:
        sink = cls(**options, **context)
    except TypeError as exc:
        raise ConfigError(f"sinks.{name}", f"bad options for a {kind} sink ({exc})") from None
    sink.name = name
    return sink
