"""The stream-level alert policy one sink applies: dedup, cooldown, escalation, grouping, resolution.

Detectors already turn a condition into episodes (one ``firing`` alert, a new alert when the severity
rises, one ``resolved`` alert). On top of that, per sink:

- **dedup** by ``alert_id``: a replayed or restarted worker re-sends alerts with the same id; each id
  is delivered once.
- **grouping** (``group_by_run``): one run is one page. While a run has an open page, more firing
  alerts of that run at the same or lower severity fold into it; a *higher* severity pages again as an
  escalation. The group resolves — one ``resolved`` delivery — when every alert type in it has resolved.
  Without grouping, each (run, alert type) is its own group.
- **cooldown** (``cooldown_s``, event time): an alert type that fires again for a run within the
  cooldown after its last page, at no higher severity, is held back (a flapping detector pages once).

Time is the alerts' own ``ts``, so replaying the alert log rebuilds exactly the same state.

>>> from detectors import Alert
>>> def alert(t, typ, sev, status="firing", ts=0.0):
...     a = Alert.new(run_id="r", step=t, detector=typ, category="c", alert_type=typ, severity=sev,
...                   message="", episode_step=t, ts=ts)
...     return a.resolved(t + 5, "ok", ts=ts) if status == "resolved" else a
>>> p = AlertPolicy(group_by_run=True, cooldown_s=300)
>>> [p.admit(a).reason for a in [alert(1, "loss_spike", "high"), alert(1, "loss_spike", "high"),
...   alert(2, "grad", "medium"), alert(3, "nan", "critical"), alert(1, "loss_spike", "high", "resolved"),
...   alert(2, "grad", "medium", "resolved"), alert(3, "nan", "critical", "resolved")]]
['new', 'duplicate', 'grouped', 'escalated', 'group_open', 'group_open', 'resolved']
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from detectors import Alert

__all__ = ["AlertPolicy", "Decision", "DELIVER"]

#: the decisions that deliver an alert
DELIVER = frozenset({"new", "escalated", "resolved"})


@dataclass(frozen=True, slots=True)
class Decision:
    #: new | escalated | resolved (delivered) — duplicate | grouped | cooldown | group_open | unpaged
    reason: str

    @property
    def deliver(self) -> bool:
        return self.reason in DELIVER


@dataclass(slots=True)
class _Group:
    open: set[str] = field(default_factory=set)
    rank: int = -1


class AlertPolicy:
    """Decides, alert by alert, what one sink delivers (see the module docstring)."""

    def __init__(self, group_by_run: bool = False, cooldown_s: float = 0.0, remember_ids: int = 100_000):
        self.group_by_run = group_by_run
        self.cooldown_s = cooldown_s
        self.remember_ids = remember_ids
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._groups: dict[tuple[str, str], _Group] = {}
        #: (run, alert type) → (ts, rank) of its last page
        self._paged: dict[tuple[str, str], tuple[float, int]] = {}

    def admit(self, alert: Alert) -> Decision:
        if alert.alert_id in self._seen:
            return Decision("duplicate")
        self._seen[alert.alert_id] = None
        if len(self._seen) > self.remember_ids:
            self._seen.popitem(last=False)
        kind = (alert.run_id, alert.alert_type)
        group_key = (alert.run_id, "" if self.group_by_run else alert.alert_type)
        group = self._groups.get(group_key)
        if alert.status == "resolved":
            if group is None or alert.alert_type not in group.open:
                return Decision("unpaged")
            group.open.discard(alert.alert_type)
            if group.open:
                return Decision("group_open")
            del self._groups[group_key]
            return Decision("resolved")
        last = self._paged.get(kind)
        if last is not None and alert.ts - last[0] < self.cooldown_s and alert.rank <= last[1]:
            if group is not None:
                group.open.add(alert.alert_type)
            return Decision("cooldown")
        if group is not None and group.open and alert.rank <= group.rank:
            group.open.add(alert.alert_type)
            return Decision("grouped")
        escalated = group is not None and bool(group.open)
        group = self._groups.setdefault(group_key, _Group())
        group.open.add(alert.alert_type)
        group.rank = max(group.rank, alert.rank)
        self._paged[kind] = (alert.ts, alert.rank)
        return Decision("escalated" if escalated else "new")
