"""Helpers for the stream-app tests: send metric records, wait on the workers' run summaries."""

from __future__ import annotations

import time
from collections.abc import Callable

from kafka import KafkaProducer

from detectors import MetricEvent
from detectors.events import encode_metric_batch
from stream_app.aggregates import RunSummary
from stream_app.runs_cli import read_runs


def healthy(run_id: str, steps: range, t0: float = 1_000.0) -> list[MetricEvent]:
    """Gently falling loss with a little deterministic wobble (no detector fires on it)."""
    return [MetricEvent(run_id, s, {"loss": 2.0 - s * 0.001 + 0.01 * ((s * 7) % 5) / 5}, ts=t0 + s)
            for s in steps]


def send(bootstrap: str, topic: str, events: list[MetricEvent], batch: int = 1) -> None:
    """Send ``events`` keyed by run id, ``batch`` steps of a run per record."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    by_run: dict[str, list[MetricEvent]] = {}
    for e in events:
        by_run.setdefault(e.run_id, []).append(e)
    for run_id, run_events in by_run.items():
        for i in range(0, len(run_events), batch):
            chunk = run_events[i:i + batch]
            value = chunk[0].to_json() if batch == 1 else encode_metric_batch(chunk)
            producer.send(topic, key=run_id.encode(), value=value)
    producer.flush()
    producer.close()


def wait_runs(bootstrap: str, app_id: str, until: Callable[[dict[str, RunSummary]], bool],
              timeout: float = 60.0) -> dict[str, RunSummary]:
    """Poll the ``run_summary`` changelog until ``until(runs)`` holds (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    runs: dict[str, RunSummary] = {}
    while time.monotonic() < deadline:
        runs = read_runs(bootstrap, f"{app_id}-run_summary-changelog")
        if until(runs):
            break
        time.sleep(0.5)
    return runs
