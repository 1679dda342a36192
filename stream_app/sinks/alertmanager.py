"""The Alertmanager sink: lossguard alerts posted to Alertmanager's API v2 (``POST /api/v2/alerts``), so
teams route, group, inhibit and silence them with the Alertmanager they already run.

Each alert becomes an Alertmanager alert with labels ``alertname`` (the alert type), ``run_id``,
``severity``, ``detector``, ``category``, ``source`` and the run's tags (label-safe names; a tag that
would shadow one of those is prefixed ``tag_``), and annotations ``summary``/``description`` (the
message) plus the step, value and threshold. Alertmanager resolves an alert that is not re-sent within
its ``resolve_timeout`` (5 min by default), so the sink re-sends every firing alert each ``resend_s``
seconds (default 60) until lossguard resolves it; the resolution is sent with ``endsAt``. A restarted sink
takes the firing alerts up again from the alert log (``Sink.replayed``) and goes on re-sending them. An episode
that escalates (medium → critical) ends its old severity's alert and fires the new one.

    [sinks.alertmanager]
    kind = "alertmanager"
    url = "http://alertmanager:9093"     # or url_env = "LOSSGUARD_ALERTMANAGER_URL" (the default)
    resend_s = 60
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from detectors import Alert
from detectors.config import ConfigError

from . import DeliveryError, Sink

__all__ = ["AlertmanagerSink", "am_alert"]

log = logging.getLogger("lossguard.sinks.alertmanager")

_CORE_LABELS = ("alertname", "run_id", "severity", "detector", "category", "source")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _label_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return name if re.match(r"[A-Za-z_]", name) else f"_{name}"


def am_alert(alert: Alert, generator_url: str = "") -> dict[str, Any]:
    """``alert`` as an Alertmanager API v2 alert (``endsAt`` set for a resolved one)."""
    meta = alert.metadata or {}
    labels = {"alertname": alert.alert_type, "run_id": alert.run_id, "severity": alert.severity,
              "detector": alert.detector, "category": alert.category, "source": str(meta.get("source") or "")}
    for key, value in (meta.get("run_tags") or {}).items():
        name = _label_name(str(key))
        labels[f"tag_{name}" if name in _CORE_LABELS or name.startswith("__") else name] = str(value)
    annotations = {"summary": f"{alert.alert_type} in run {alert.run_id} at step {alert.step}",
                   "description": alert.message, "step": str(alert.step),
                   "episode_step": str(meta.get("episode_step", alert.step))}
    for name in ("value", "threshold"):
        if getattr(alert, name) is not None:
            annotations[name] = repr(getattr(alert, name))
    body: dict[str, Any] = {"labels": {k: v for k, v in labels.items() if v != ""}, "annotations": annotations,
                            "startsAt": _iso(alert.ts)}
    if generator_url:
        body["generatorURL"] = generator_url
    return body


class AlertmanagerSink(Sink):
    #: Alertmanager groups and throttles itself: every new, escalated and resolved alert goes through
    paging = False

    def __init__(self, url: str = "", url_env: str = "LOSSGUARD_ALERTMANAGER_URL", resend_s: float = 60.0,
                 timeout_s: float = 5.0, generator_url: str = "", **_context: Any):
        self.url = (url or os.environ.get(url_env, "")).rstrip("/")
        if not self.url:
            raise ConfigError("sinks.alertmanager.url", f"give url = \"http://host:9093\" or set {url_env}")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError("sinks.alertmanager.url", f"expected an http(s) URL, got {self.url!r}")
        if resend_s <= 0:
            raise ConfigError("sinks.alertmanager.resend_s", f"expected a positive number, got {resend_s!r}")
        self.resend_s = float(resend_s)
        self.timeout_s = float(timeout_s)
        self.generator_url = generator_url
        #: episode → the firing Alertmanager alert, re-sent until resolved
        self._firing: dict[tuple[str, str, str, Any], dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._resender = threading.Thread(target=self._resend_loop, name="alertmanager-resend", daemon=True)
        self._resender.start()

    @staticmethod
    def _episode(alert: Alert) -> tuple[str, str, str, Any]:
        return (alert.run_id, alert.detector, alert.alert_type, (alert.metadata or {}).get("episode_step"))

    def deliver(self, alert: Alert, reason: str) -> None:
        batch = self._batch(alert)
        self._post(batch)
        self._remember(alert, batch)

    def replayed(self, alert: Alert, reason: str) -> None:
        """A restarted sink takes up the firing alerts it sent before: it re-sends them (Alertmanager would
        resolve them after its ``resolve_timeout`` otherwise) and ends them when lossguard resolves them."""
        self._remember(alert, self._batch(alert))

    def _batch(self, alert: Alert) -> list[dict[str, Any]]:
        """The Alertmanager alerts that deliver ``alert`` (an escalation also ends the old severity's)."""
        episode = self._episode(alert)
        with self._lock:
            previous = self._firing.get(episode)
        now = _iso(alert.ts)
        batch = []
        if alert.status == "resolved":
            ended = previous or am_alert(alert, self.generator_url)
            batch.append({**ended, "endsAt": now})
        else:
            current = am_alert(alert, self.generator_url)
            if previous is not None:
                current["startsAt"] = previous["startsAt"]
                if previous["labels"] != current["labels"]:  # escalated: the old severity's alert ends
                    batch.append({**previous, "endsAt": now})
            batch.append(current)
        return batch

    def _remember(self, alert: Alert, batch: list[dict[str, Any]]) -> None:
        episode = self._episode(alert)
        with self._lock:
            if alert.status == "resolved":
                self._firing.pop(episode, None)
            else:
                self._firing[episode] = batch[-1]

    def _post(self, alerts: list[dict[str, Any]]) -> None:
        request = urllib.request.Request(f"{self.url}/api/v2/alerts", data=json.dumps(alerts).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read()
        except (urllib.error.URLError, OSError) as exc:  # HTTPError (non-2xx) is a URLError
            raise DeliveryError(f"alertmanager at {self.url} did not take {len(alerts)} alert(s): {exc}") from exc

    def _resend_loop(self) -> None:
        while not self._stop.wait(self.resend_s):
            with self._lock:
                firing = list(self._firing.values())
            if firing:
                try:
                    self._post(firing)
                except DeliveryError as exc:
                    log.warning("%s; the next re-send is in %.0fs", exc, self.resend_s)

    def close(self) -> None:
        self._stop.set()
        self._resender.join(self.timeout_s + 1)
