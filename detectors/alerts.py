"""Alert events: what detectors say, in the one shape used on the alert topic, in files and in-process.

An alert's id is stable: it is derived from the run, the detector, the alert type, the step at which the
problem began and the status, so a replayed or restarted worker produces the same id for the same
episode and a sink can drop the duplicate.

>>> a = Alert.new(run_id="r1", step=40, detector="nonfinite", category="numerics",
...               alert_type="nonfinite_metric", severity="critical", message="loss is NaN",
...               episode_step=40)
>>> a.alert_id == Alert.new(run_id="r1", step=40, detector="nonfinite", category="numerics",
...     alert_type="nonfinite_metric", severity="critical", message="x", episode_step=40).alert_id
True
>>> Alert.from_dict(a.to_dict()) == a
True
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from .events import SCHEMA_VERSION, SchemaError, dumps, encode_number, loads

__all__ = ["Alert", "SEVERITIES", "severity_rank", "decode_alert"]

#: Severities from least to most urgent.
SEVERITIES = ("low", "medium", "high", "critical")
STATUSES = ("firing", "resolved")


def severity_rank(severity: str) -> int:
    """0 for low … 3 for critical."""
    return SEVERITIES.index(severity)


def _alert_id(run_id: str, detector: str, alert_type: str, episode_step: int, status: str, severity: str,
              episode_key: str | None = None) -> str:
    raw = f"{run_id}\x1f{detector}\x1f{alert_type}\x1f{episode_step}\x1f{status}\x1f{severity}"
    if episode_key is not None:  # one of several episodes of this type at once (one per metric, say)
        raw += f"\x1f{episode_key}"
    return hashlib.blake2b(raw.encode(), digest_size=10).hexdigest()


def _json_number(x: float | None) -> float | str | None:
    return None if x is None else encode_number(float(x))


def _read_number(x: Any) -> float | None:
    if x is None:
        return None
    if isinstance(x, str):
        return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[x]
    return float(x)


@dataclass(slots=True)
class Alert:
    alert_id: str
    run_id: str
    step: int
    ts: float
    detector: str
    category: str
    alert_type: str
    severity: str
    status: str
    message: str
    value: float | None = None
    threshold: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    v: int = SCHEMA_VERSION

    @classmethod
    def new(cls, *, run_id: str, step: int, detector: str, category: str, alert_type: str,
            severity: str, message: str, value: float | None = None, threshold: float | None = None,
            metadata: dict[str, Any] | None = None, status: str = "firing",
            episode_step: int | None = None, ts: float | None = None, episode_key: str | None = None) -> Alert:
        """Build an alert; ``episode_step`` (the step the problem began) makes the id stable, and
        ``episode_key`` tells apart episodes of one type that run at once (kept in the metadata)."""
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        start = step if episode_step is None else episode_step
        meta = dict(metadata or {})
        meta.setdefault("episode_step", start)
        if episode_key is not None:
            meta["episode_key"] = episode_key
        return cls(alert_id=_alert_id(run_id, detector, alert_type, start, status, severity, episode_key),
                   run_id=run_id, step=step, ts=time.time() if ts is None else ts, detector=detector,
                   category=category, alert_type=alert_type, severity=severity, status=status,
                   message=message, value=value, threshold=threshold, metadata=meta)

    def resolved(self, step: int, message: str, ts: float | None = None) -> Alert:
        """The resolved twin of a firing alert (same episode, new id)."""
        episode = self.metadata.get("episode_step", self.step)
        return replace(self, alert_id=_alert_id(self.run_id, self.detector, self.alert_type, episode,
                                                "resolved", self.severity, self.metadata.get("episode_key")),
                       step=step, status="resolved", message=message,
                       ts=time.time() if ts is None else ts, metadata=dict(self.metadata))

    @property
    def rank(self) -> int:
        return severity_rank(self.severity)

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": self.v, "alert_id": self.alert_id, "run_id": self.run_id, "step": self.step,
            "ts": self.ts, "detector": self.detector, "category": self.category,
            "alert_type": self.alert_type, "severity": self.severity, "status": self.status,
            "message": self.message, "value": _json_number(self.value),
            "threshold": _json_number(self.threshold), "metadata": _json_safe(self.metadata),
        }

    def to_json(self) -> bytes:
        return dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Alert:
        try:
            alert = cls(alert_id=d["alert_id"], run_id=d["run_id"], step=int(d["step"]), ts=float(d["ts"]),
                        detector=d["detector"], category=d["category"], alert_type=d["alert_type"],
                        severity=d["severity"], status=d["status"], message=d["message"],
                        value=_read_number(d.get("value")), threshold=_read_number(d.get("threshold")),
                        metadata=dict(d.get("metadata") or {}), v=d.get("v", SCHEMA_VERSION))
        except KeyError as exc:
            raise SchemaError(exc.args[0], "missing") from None
        if alert.severity not in SEVERITIES:
            raise SchemaError("severity", f"expected one of {SEVERITIES}, got {alert.severity!r}")
        return alert


def decode_alert(data: bytes | str) -> Alert:
    return Alert.from_dict(loads(data))


def _json_safe(obj: Any) -> Any:
    """Metadata may carry numpy scalars or non-finite floats; make it strict-JSON encodable."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    try:
        return encode_number(float(obj))
    except (TypeError, ValueError):
        return str(obj)
