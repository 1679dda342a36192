"""SageMaker training jobs through CloudWatch: metric definitions become metric events.

A SageMaker training job with ``MetricDefinitions`` publishes each metric to the CloudWatch namespace
``/aws/sagemaker/TrainingJobs`` with the dimension ``TrainingJobName``. :class:`SageMakerJobPoller` finds the
job's metrics (``list_metrics``, or the names you give), fetches new datapoints with ``get_metric_data``
(one query per metric, ``period``-second bins), and emits one event per completed bin, in time order, with
the metric names mapped through ``detectors.aliases`` (``train:loss`` style names keep their own name unless
an alias knows them). CloudWatch has no step numbers: the step of an event is the count of bins seen so
far. ``describe_training_job`` status changes become ``job_status`` events, as for Bedrock; the job is
stopped through :class:`producers.managed.JobStopper` (``stop_training_job``).
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from detectors.aliases import canonical_name
from detectors.events import MetricEvent

from .managed import TERMINAL_STATUSES, aws_client, status_event

__all__ = ["NAMESPACE", "DIMENSION", "SageMakerJobPoller"]

log = logging.getLogger("lossguard.cloudwatch")

NAMESPACE = "/aws/sagemaker/TrainingJobs"
DIMENSION = "TrainingJobName"
#: how far back the first poll reads when neither ``since`` nor the job's start time is known
LOOKBACK = timedelta(hours=3)
_MAX_QUERIES = 500  # get_metric_data's limit per request


class SageMakerJobPoller:
    """One SageMaker training job's CloudWatch metrics and status as metric events.

    Args:
        job_name: the training job name.
        run_id: run id of the events (default ``sagemaker:<job name>``).
        cloudwatch, sagemaker: boto3 clients (built when omitted; ``sagemaker=False`` skips status polling).
        metric_names: the metric names to read (default: whatever ``list_metrics`` finds for the job).
        period: bin size in seconds (60 for standard-resolution metrics).
        stat: the CloudWatch statistic of each bin.
        since: read datapoints from this time on (default: the job's start, else ``LOOKBACK`` ago).
        delay: bins younger than this many seconds wait for the next poll (CloudWatch makes datapoints
            visible after a short delay; a bin read too early would miss them).
    """

    service = "sagemaker"
    source = "sagemaker"

    def __init__(self, job_name: str, *, run_id: str | None = None, cloudwatch: Any = None,
                 sagemaker: Any = None, region: str | None = None, metric_names: list[str] | None = None,
                 period: int = 60, stat: str = "Average", since: datetime | None = None,
                 delay: float = 60.0):
        self.job_name = job_name
        self.run_id = run_id or f"sagemaker:{job_name}"
        self.cloudwatch = cloudwatch or aws_client("cloudwatch", region=region)
        self.sagemaker = None if sagemaker is False else (sagemaker or aws_client("sagemaker", region=region))
        self.metric_names = list(metric_names or [])
        self.period = int(period)
        self.stat = stat
        self.since = since
        self.status: str | None = None if self.sagemaker is not None else "InProgress"
        self.failure_message = ""
        self.step = 0
        self._since: datetime | None = None  # start of the first bin not emitted yet
        self.delay = delay
        self._ended = self._end_seen = False
        self._last_ts = 0.0

    @property
    def finished(self) -> bool:
        return self._ended

    def _ts(self, ts: float) -> float:
        self._last_ts = max(ts, self._last_ts + 1e-6)
        return self._last_ts

    def _discover(self) -> list[str]:
        names: set[str] = set()
        paginator = self.cloudwatch.get_paginator("list_metrics")
        for page in paginator.paginate(Namespace=NAMESPACE,
                                       Dimensions=[{"Name": DIMENSION, "Value": self.job_name}]):
            names.update(m["MetricName"] for m in page.get("Metrics", []))
        return sorted(names)

    def _align(self, t: datetime) -> datetime:
        epoch = int(t.timestamp())
        return datetime.fromtimestamp(epoch - epoch % self.period, UTC)

    def poll(self) -> list[MetricEvent]:
        """Status change (if any) and the events of the bins completed since the last poll."""
        events: list[MetricEvent] = []
        status, message, started = self.status, "", None
        if self.sagemaker is not None:
            job = self.sagemaker.describe_training_job(TrainingJobName=self.job_name)
            status = job.get("TrainingJobStatus", "")
            message = job.get("FailureReason", "") if status in ("Failed", "Stopped") else ""
            started = job.get("TrainingStartTime") or job.get("CreationTime")
        now = datetime.now(UTC)
        if self._since is None:
            start = self.since or (started if isinstance(started, datetime) else now - LOOKBACK)
            self._since = self._align(start.astimezone(UTC) if start.tzinfo else start.replace(tzinfo=UTC))
        names = self.metric_names or self._discover()
        if status in TERMINAL_STATUSES:  # the job wrote its last datapoint: read to the end
            end = self._align(now) + timedelta(seconds=self.period)
        else:  # only complete, settled bins
            end = self._align(now - timedelta(seconds=self.delay))
        if names and end > self._since:
            events += self._fetch(names, self._since, end)
            self._since = end
        if status != self.status:
            events.append(status_event(self.run_id, self.step, status or "Unknown", source=self.source,
                                       ts=self._ts(time.time()), message=message))
            log.info("sagemaker job %s: %s%s", self.job_name, status, f" ({message})" if message else "")
            self.status, self.failure_message = status, message
        if status in TERMINAL_STATUSES:
            self._ended = self._end_seen  # one more poll after the end picks up the last bins
            self._end_seen = True
        return events

    def _fetch(self, names: list[str], start: datetime, end: datetime) -> list[MetricEvent]:
        by_time: dict[datetime, dict[str, float]] = {}
        for first in range(0, len(names), _MAX_QUERIES):
            batch = names[first:first + _MAX_QUERIES]
            queries = [{"Id": f"m{i}", "ReturnData": True, "MetricStat": {
                "Metric": {"Namespace": NAMESPACE, "MetricName": name,
                           "Dimensions": [{"Name": DIMENSION, "Value": self.job_name}]},
                "Period": self.period, "Stat": self.stat}} for i, name in enumerate(batch)]
            token = None
            while True:
                kwargs: dict[str, Any] = {"MetricDataQueries": queries, "StartTime": start, "EndTime": end,
                                          "ScanBy": "TimestampAscending"}
                if token:
                    kwargs["NextToken"] = token
                page = self.cloudwatch.get_metric_data(**kwargs)
                for result in page.get("MetricDataResults", []):
                    name = canonical_name(batch[int(result["Id"][1:])])
                    for t, value in zip(result.get("Timestamps", []), result.get("Values", []), strict=False):
                        by_time.setdefault(t, {})[name] = float(value)
                token = page.get("NextToken")
                if not token:
                    break
        events = []
        for t in sorted(by_time):
            self.step += 1
            events.append(MetricEvent(run_id=self.run_id, step=self.step, metrics=by_time[t],
                                      ts=self._ts(t.timestamp()), source=self.source,
                                      tags={"job": self.job_name}))
        return events
