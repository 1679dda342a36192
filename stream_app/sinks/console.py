"""The console sink: one line per alert on stdout (what ``lossguard alerts tail`` shows)."""

from __future__ import annotations

import sys
from typing import Any

from detectors import Alert

from ..alerts_cli import format_alert
from . import Sink

__all__ = ["ConsoleSink"]


class ConsoleSink(Sink):
    def __init__(self, json: bool = False, **_context: Any):
        self.json = json
        self.colour = sys.stdout.isatty() and not json

    def deliver(self, alert: Alert, reason: str) -> None:
        line = alert.to_json().decode() if self.json else format_alert(alert, self.colour)
        print(line, flush=True)
