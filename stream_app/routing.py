"""Declarative alert routing, in the spirit of Alertmanager: sinks and routes are data.

A routes file (TOML, ``--routes`` / ``LOSSGUARD_ROUTES``) names the sinks and the routes to them::

    [sinks.console]                    # kind defaults to the name
    [sinks.jsonl]
    dir = "alerts"
    [sinks.pager]
    kind = "webhook"                   # URL from LOSSGUARD_WEBHOOK_URL, or url_env = "MY_VAR"
    group_by_run = true                # one page per run (default for webhook/autostop)
    cooldown_s = 600
    [sinks.stop_managed]
    kind = "autostop"
    stopper = "producers.managed:JobStopper"   # default: a ControlEvent on <prefix>.control

    [[routes]]                         # checked in order; the first match wins unless continue = true
    sinks = ["console", "jsonl"]
    continue = true
    [[routes]]
    match = { severity = ">=critical", source = ["bedrock", "sagemaker"] }
    sinks = ["pager", "stop_managed"]
    [[routes]]
    match = { severity = ">=high", "tags.team" = "nlp-*" }
    sinks = ["pager"]

Match keys: ``run_id, alert_type, category, detector, status, source, severity`` and ``tags.NAME``
(the run's tags); a value is a glob or a list of globs (any matches), severity also ``>=LEVEL``.
Without a file: console and JSONL get everything; the webhook gets high and critical when a URL is set.

>>> router = Router([Route(match={"severity": ">=high"}, sinks=["pager"])])
>>> from detectors import Alert
>>> a = Alert.new(run_id="r", step=1, detector="d", category="c", alert_type="t", severity="critical",
...               message="")
>>> router.sinks_for(a)
['pager']
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any

from detectors import SEVERITIES, Alert, severity_rank
from detectors.config import ConfigError

from .settings import read_toml

__all__ = ["Route", "Router", "RoutingConfig", "load_routing"]

_FIELDS = ("run_id", "alert_type", "category", "detector", "status", "severity")


@dataclass(slots=True)
class Route:
    match: dict[str, str | list[str]] = field(default_factory=dict)
    sinks: list[str] = field(default_factory=list)
    #: keep looking at the routes below after this one matched
    continue_: bool = False

    def matches(self, alert: Alert) -> bool:
        return all(_value_matches(alert, key, wanted) for key, wanted in self.match.items())


def _alert_value(alert: Alert, key: str) -> str:
    if key in _FIELDS:
        return getattr(alert, key)
    if key == "source":
        return str(alert.metadata.get("source", ""))
    return str((alert.metadata.get("run_tags") or {}).get(key.removeprefix("tags."), ""))


def _value_matches(alert: Alert, key: str, wanted: str | list[str]) -> bool:
    options = [wanted] if isinstance(wanted, str) else wanted
    if key == "severity":
        return any(alert.rank >= severity_rank(o[2:]) if o.startswith(">=") else alert.severity == o
                   for o in options)
    value = _alert_value(alert, key)
    return any(fnmatch.fnmatchcase(value, o) for o in options)


class Router:
    def __init__(self, routes: list[Route]):
        self.routes = routes

    def sinks_for(self, alert: Alert) -> list[str]:
        """The sinks ``alert`` goes to, in route order, each once."""
        chosen: list[str] = []
        for route in self.routes:
            if route.matches(alert):
                chosen.extend(s for s in route.sinks if s not in chosen)
                if not route.continue_:
                    break
        return chosen


@dataclass(slots=True)
class RoutingConfig:
    #: sink name → its options (``kind`` included)
    sinks: dict[str, dict[str, Any]]
    router: Router


def _check_route(i: int, raw: dict[str, Any], sinks: dict[str, Any]) -> Route:
    unknown = set(raw) - {"match", "sinks", "continue"}
    if unknown:
        raise ConfigError(f"routes[{i}]", f"unknown key(s) {sorted(unknown)} (known: continue, match, sinks)")
    match = raw.get("match", {})
    for key, value in match.items():
        if key not in (*_FIELDS, "source") and not key.startswith("tags."):
            raise ConfigError(f"routes[{i}].match.{key}", f"unknown key (known: {', '.join(_FIELDS)}, source, tags.NAME)")
        if key == "severity":
            for option in [value] if isinstance(value, str) else value:
                if option.removeprefix(">=") not in SEVERITIES:
                    raise ConfigError(f"routes[{i}].match.severity", f"expected a severity or >=severity, got {option!r}")
    for name in raw.get("sinks", []):
        if name not in sinks:
            raise ConfigError(f"routes[{i}].sinks", f"no sink named {name!r} (defined: {', '.join(sinks)})")
    return Route(match=dict(match), sinks=list(raw.get("sinks", [])), continue_=bool(raw.get("continue", False)))


def load_routing(path: str | os.PathLike | None = None, webhook_url: str = "") -> RoutingConfig:
    """Sinks and routes from ``path``, or the defaults (see the module docstring)."""
    if not path:
        sinks: dict[str, dict[str, Any]] = {"console": {"kind": "console"}, "jsonl": {"kind": "jsonl"}}
        routes = [Route(sinks=["console", "jsonl"], continue_=True)]
        if webhook_url:
            sinks["webhook"] = {"kind": "webhook"}
            routes.append(Route(match={"severity": ">=high"}, sinks=["webhook"]))
        return RoutingConfig(sinks, Router(routes))
    doc = read_toml(path, "routes")
    unknown = set(doc) - {"sinks", "routes"}
    if unknown:
        raise ConfigError("routes", f"unknown section(s) {sorted(unknown)} in {path} (known: routes, sinks)")
    sinks = {name: {"kind": name, **options} for name, options in doc.get("sinks", {}).items()}
    routes = [_check_route(i, raw, sinks) for i, raw in enumerate(doc.get("routes", []))]
    return RoutingConfig(sinks, Router(routes))
