"""Prometheus metrics (``prometheus_client``) for the worker's and ``lossguard sinks``' ``/metrics``.

Names follow Prometheus conventions: ``lossguard_`` prefix, counters end in ``_total``, times in seconds.

Worker:
    lossguard_records_processed_total                 metric records read from the metrics topic
    lossguard_events_processed_total                  steps fed to the detectors (new and resumed)
    lossguard_steps_dropped_total{reason}             duplicate / out_of_order steps
    lossguard_alerts_total{alert_type,severity,status} alert events published
    lossguard_dead_letters_total{reason}              records sent to the dead-letter topic
    lossguard_processing_latency_seconds              record timestamp → processed (histogram)
    lossguard_consumer_lag{topic,partition}           records behind the partition's end
    lossguard_runs_tracked                            runs in this worker's partitions
Sinks:
    lossguard_sink_decisions_total{sink,decision}     new / escalated / resolved / duplicate / silenced ...
    lossguard_sink_deliveries_total{sink}             alerts a sink took
    lossguard_sink_delivery_failures_total{sink}      failed attempts (each retried with backoff)

Each owner builds its own :class:`~prometheus_client.CollectorRegistry` (tests pass theirs); counts kept
elsewhere (the worker's ``counters``, the sink runners' ``counts``) are read at scrape time by a
collector, so the hot path pays only for the alert counter and the latency histogram.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["SinkMetrics", "WorkerMetrics"]

#: processing latency buckets, seconds: a few ms on a quiet worker up to minutes behind a backlog
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class _CountersCollector(Collector):
    def __init__(self, counters: Mapping[str, Any], runs_tracked: Callable[[], int],
                 lag: Callable[[], Iterable[tuple[str, int, int]]]):
        self.counters, self.runs_tracked, self.lag = counters, runs_tracked, lag

    def collect(self) -> Iterator[Any]:
        c = self.counters
        yield CounterMetricFamily("lossguard_records_processed", "Metric records read from the metrics topic.",
                                  value=c.get("records", 0))
        yield CounterMetricFamily("lossguard_events_processed", "Training steps fed to the detectors.",
                                  value=c.get("events", 0))
        dropped = CounterMetricFamily("lossguard_steps_dropped", "Steps not fed to the detectors, by reason.",
                                      labels=["reason"])
        for reason in ("duplicates", "out_of_order"):
            dropped.add_metric([reason.rstrip("s")], c.get(reason, 0))
        yield dropped
        dead = CounterMetricFamily("lossguard_dead_letters", "Records sent to the dead-letter topic, by reason.",
                                   labels=["reason"])
        for reason, n in sorted(c.get("dead_letter_reasons", {}).items()):
            dead.add_metric([reason], n)
        yield dead
        yield GaugeMetricFamily("lossguard_runs_tracked", "Runs in this worker's partitions.",
                                value=self.runs_tracked())
        lag = GaugeMetricFamily("lossguard_consumer_lag", "Records behind the end of each assigned partition.",
                                labels=["topic", "partition"])
        for topic, partition, behind in self.lag():
            lag.add_metric([topic, str(partition)], behind)
        yield lag


class WorkerMetrics:
    """The worker's metrics; ``alert_published`` and ``record_processed`` are called by the agent."""

    def __init__(self, counters: Mapping[str, Any], registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self._alerts = Counter("lossguard_alerts", "Alert events published, by type, severity and status.",
                               ["alert_type", "severity", "status"], registry=self.registry)
        self._latency = Histogram("lossguard_processing_latency_seconds",
                                  "From a metric record's timestamp to the end of its processing.",
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self.counters = counters
        self._runs_tracked: Callable[[], int] = lambda: 0
        self._lag: Callable[[], Iterable[tuple[str, int, int]]] = lambda: ()
        self.registry.register(_CountersCollector(counters, lambda: self._runs_tracked(), lambda: self._lag()))

    def watch(self, runs_tracked: Callable[[], int], lag: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        """Where the scrape reads the runs tracked and the consumer lag (known once the app is built)."""
        self._runs_tracked, self._lag = runs_tracked, lag

    def alert_published(self, alert: Any) -> None:
        self._alerts.labels(alert.alert_type, alert.severity, alert.status).inc()

    def record_processed(self, record_ts: float | None) -> None:
        if record_ts:
            self._latency.observe(max(0.0, time.time() - record_ts))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _SinkCollector(Collector):
    def __init__(self, runners: Iterable[Any]):
        self.runners = list(runners)

    def collect(self) -> Iterator[Any]:
        decisions = CounterMetricFamily("lossguard_sink_decisions", "Alerts each sink saw, by decision.",
                                        labels=["sink", "decision"])
        delivered = CounterMetricFamily("lossguard_sink_deliveries", "Alerts each sink delivered.",
                                        labels=["sink"])
        failed = CounterMetricFamily("lossguard_sink_delivery_failures",
                                     "Failed delivery attempts of each sink (each retried).", labels=["sink"])
        for runner in self.runners:
            counts = dict(runner.counts)
            for decision, n in sorted(counts.items()):
                if decision not in ("delivered", "delivery_failed"):
                    decisions.add_metric([runner.sink.name, decision], n)
            delivered.add_metric([runner.sink.name], counts.get("delivered", 0))
            failed.add_metric([runner.sink.name], counts.get("delivery_failed", 0))
        yield from (decisions, delivered, failed)


class SinkMetrics:
    """``lossguard sinks``' metrics, read from its runners' counts at scrape time."""

    def __init__(self, runners: Iterable[Any], registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.registry.register(_SinkCollector(runners))

    def serve(self, port: int, addr: str = "127.0.0.1") -> Any:
        """Serve ``/metrics`` on ``addr:port`` from a daemon thread; returns the HTTP server."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server
