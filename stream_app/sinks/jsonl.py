"""The JSONL sink: ``DIR/<run>.alerts.jsonl`` (one alert event a line) and ``DIR/<run>.summary.json``,
where ``<run>`` is :func:`run_file_stem` of the run id (readable start + a hash of the whole id).

The summary is :func:`stream_app.report.summarize` over the run's file, rewritten after each alert.
A run's file is read back the first time the sink sees the run, so a restarted sink continues the
summary and never writes an alert id twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from detectors import Alert, decode_alert

from ..report import summarize
from . import Sink

__all__ = ["JsonlSink", "run_file_stem"]


#: characters of the run id kept readable in a file name (the hash makes it unique)
STEM_CHARS = 64


def run_file_stem(run_id: str) -> str:
    """A file-name stem for a run id: its first characters made safe (letters, digits, ``._-``; no leading
    dot) plus a short hash of the whole id, so two different run ids never share a file and any id
    fits a file system's 255-byte name limit.

    >>> run_file_stem("bedrock:job/1"), run_file_stem("bedrock_job_1")
    ('bedrock_job_1-54806749', 'bedrock_job_1-eab6c417')
    >>> run_file_stem(".."), len(run_file_stem("x" * 10_000))
    ('_.-5ec1f7e7', 73)
    """
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", run_id[:STEM_CHARS])
    if readable.startswith("."):
        readable = "_" + readable[1:]
    digest = hashlib.sha256(run_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{readable}-{digest}"


class JsonlSink(Sink):
    def __init__(self, dir: str | None = None, latest: int = 10, settings: Any = None, **_context: Any):
        self.dir = Path(dir or (settings.alerts_dir if settings else "lossguard-alerts"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.latest = latest
        self._runs: dict[str, list[Alert]] = {}

    def _alerts_of(self, run_id: str) -> list[Alert]:
        alerts = self._runs.get(run_id)
        if alerts is None:
            path = self.dir / f"{run_file_stem(run_id)}.alerts.jsonl"
            alerts = [decode_alert(line) for line in path.read_text().splitlines() if line.strip()] \
                if path.exists() else []
            self._runs[run_id] = alerts
        return alerts

    def deliver(self, alert: Alert, reason: str) -> None:
        alerts = self._alerts_of(alert.run_id)
        if any(a.alert_id == alert.alert_id for a in alerts):
            return
        stem = run_file_stem(alert.run_id)
        with open(self.dir / f"{stem}.alerts.jsonl", "ab") as f:
            f.write(alert.to_json() + b"\n")
        alerts.append(alert)
        tmp = self.dir / f".{stem}.summary.json.tmp"
        tmp.write_text(json.dumps(summarize(alert.run_id, alerts, self.latest), indent=2))
        os.replace(tmp, self.dir / f"{stem}.summary.json")
