"""Managed training jobs (Bedrock model customization, SageMaker training): what both pollers share.

A *poller* turns one managed job's state and metrics into metric events (``poll() -> list[MetricEvent]``);
:class:`JobMonitor` drives a poller until the job ends — polling on an interval, backing off when AWS
throttles, ending with a clear :class:`PollerError` on validation, access-denied or not-found errors —
hands every event to a sink (the Kafka emitter), runs the detectors in-process when asked, and stops the
job through :class:`JobStopper` on a critical alert. With a :class:`JobLog` it keeps the job's audit
trail on disk: the metrics of every poll, and every issue with the recovery action it caused.

:class:`JobStopper` is the one place a managed job is stopped (``stop_model_customization_job`` or
``stop_training_job``), once per run, with the reason logged. Run ids of managed jobs are
``bedrock:<job name>`` and ``sagemaker:<training job name>``, so a stopper can act on an alert's run id
alone — which is what the stream app's auto-stop sink does.

AWS clients are built by :func:`aws_client` with the botocore retry mode set explicitly (``standard`` by
default, or ``adaptive``); ``AWS_ENDPOINT_URL`` and the usual credential chain are honoured, and neither
credentials nor client configuration are ever logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from detectors.alerts import Alert, severity_rank
from detectors.driver import RunDriver
from detectors.events import MetricEvent
from detectors.suite import DetectorSuite

__all__ = [
    "JOB_STATUS_CODES", "TERMINAL_STATUSES", "PollerError", "JobPoller", "JobStopper", "JobMonitor", "JobLog",
    "MonitorResult", "aws_client", "error_kind", "describe_error", "status_event", "split_run_id",
]

log = logging.getLogger("lossguard.managed")

#: the ``job_status`` metric of a status event: one number per state, so it can be charted
JOB_STATUS_CODES = {"InProgress": 0, "Completed": 1, "Stopping": 2, "Stopped": 3, "Failed": 4}
TERMINAL_STATUSES = ("Completed", "Stopped", "Failed")

_FATAL_CODES = {
    "ValidationException": "the request was rejected as invalid",
    "ValidationError": "the request was rejected as invalid",
    "AccessDeniedException": "access denied: the credentials in use lack the IAM permission",
    "AccessDenied": "access denied: the credentials in use lack the IAM permission",
    "UnrecognizedClientException": "the credentials are not valid for this account/region",
    "InvalidClientTokenId": "the credentials are not valid for this account/region",
    "ExpiredToken": "the session credentials have expired; refresh them (e.g. aws sso login)",
    "ExpiredTokenException": "the session credentials have expired; refresh them (e.g. aws sso login)",
    "ResourceNotFoundException": "not found: check the job id and the region",
    "NoSuchBucket": "the S3 bucket does not exist: check the output/training S3 URI",
    "ResourceNotFound": "not found: check the job id and the region",
}
_THROTTLE_CODES = {"ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded",
                   "SlowDown", "ProvisionedThroughputExceededException", "ServiceQuotaExceededException"}


class PollerError(RuntimeError):
    """A poll that cannot succeed by retrying; the message says what to fix."""


def aws_client(service: str, *, region: str | None = None, retry_mode: str = "standard",
               max_attempts: int = 5) -> Any:
    """A boto3 client with the retry mode set explicitly (``standard`` or ``adaptive``).

    The endpoint comes from ``AWS_ENDPOINT_URL`` when set (boto3 honours it), the region from ``region``
    or the usual ``AWS_REGION``/``AWS_DEFAULT_REGION``/profile chain.
    """
    if retry_mode not in ("standard", "adaptive", "legacy"):
        raise ValueError(f"retry_mode must be 'standard' or 'adaptive', got {retry_mode!r}")
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": retry_mode, "max_attempts": max_attempts}, user_agent_extra="lossguard",
                    connect_timeout=10, read_timeout=30)
    session = boto3.session.Session()
    region = region or os.environ.get("AWS_REGION") or session.region_name
    if not region:
        raise PollerError("no AWS region configured: pass --region or set AWS_REGION")
    return session.client(service, region_name=region, config=config)


def error_kind(exc: BaseException) -> str:
    """``fatal`` (stop polling), ``throttle`` (back off) or ``transient`` (retry on the next poll)."""
    from botocore.exceptions import ClientError, NoCredentialsError, NoRegionError, PartialCredentialsError

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError, NoRegionError, PollerError)):
        return "fatal"
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in _THROTTLE_CODES:
            return "throttle"
        if code in _FATAL_CODES or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (403, 404):
            return "fatal"
    return "transient"


def describe_error(exc: BaseException, what: str) -> str:
    """A one-line message for ``exc`` while doing ``what``: the AWS code, its meaning, what to do next."""
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return (f"{what}: no AWS credentials found; set AWS_PROFILE, run `aws configure`, or export "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code", "Unknown")
        hint = _FATAL_CODES.get(code, "")
        return f"{what}: {code}: {err.get('Message', '')}" + (f" ({hint})" if hint else "")
    return f"{what}: {exc.__class__.__name__}: {exc}"


def split_run_id(run_id: str) -> tuple[str, str]:
    """``bedrock:my-job`` → ``("bedrock", "my-job")``; raises ValueError for other run ids."""
    service, sep, job = run_id.partition(":")
    if not sep or service not in ("bedrock", "sagemaker") or not job:
        raise ValueError(f"run id {run_id!r} names no managed job; expected 'bedrock:<job>' or "
                         "'sagemaker:<training job>', or register it with JobStopper.track()")
    return service, job


def status_event(run_id: str, step: int, status: str, *, source: str, ts: float,
                 message: str = "", extra: dict[str, float] | None = None) -> MetricEvent:
    """The metric event for a job status transition: ``job_status`` metric and tag, failure message tag."""
    tags = {"job_status": status}
    if message:
        tags["failure_message"] = message
    metrics = {"job_status": float(JOB_STATUS_CODES.get(status, -1)), **(extra or {})}
    return MetricEvent(run_id=run_id, step=step, metrics=metrics, ts=ts, source=source, tags=tags)


class JobStopper:
    """Stops managed jobs by run id — each run at most once — through the right boto3 client.

    Args:
        clients: service name (``bedrock``/``sagemaker``) → boto3 client; missing ones are built on first
            use with :func:`aws_client` and ``region``.
        region: region for clients built here.

    >>> stopper = JobStopper(clients={"bedrock": None})
    >>> stopper.job_for("bedrock:ft-1")
    ('bedrock', 'ft-1')
    """

    def __init__(self, clients: dict[str, Any] | None = None, region: str | None = None):
        self.clients = dict(clients or {})
        self.region = region
        #: run id → reason of the stop that was requested
        self.stopped: dict[str, str] = {}
        #: run id → why its stop request failed
        self.failures: dict[str, str] = {}
        self._jobs: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def track(self, run_id: str, service: str, job_id: str) -> None:
        """Map a custom run id to its job (run ids of the form ``service:job`` need no registration)."""
        self._jobs[run_id] = (service, job_id)

    def job_for(self, run_id: str) -> tuple[str, str]:
        return self._jobs.get(run_id) or split_run_id(run_id)

    def stop(self, run_id: str, reason: str) -> bool:
        """Ask AWS to stop the run's job; ``True`` when this call sent the stop request.

        A second call for the same run does nothing. AWS errors (e.g. the job already ended) are logged,
        not raised: a failed stop must not take the monitor down.
        """
        with self._lock:
            if run_id in self.stopped:
                return False
            self.stopped[run_id] = reason
        service, job_id = self.job_for(run_id)
        client = self.clients.get(service)
        try:
            if client is None:
                client = self.clients[service] = aws_client(service, region=self.region)
            if service == "bedrock":
                client.stop_model_customization_job(jobIdentifier=job_id)
            else:
                client.stop_training_job(TrainingJobName=job_id)
        except Exception as exc:  # noqa: BLE001 — logged with what to do; the monitor carries on
            self.failures[run_id] = describe_error(exc, "stop request failed")
            log.error("auto-stop: could not stop %s job %s: %s", service, job_id, self.failures[run_id])
            return False
        log.warning("auto-stop: stop requested for %s job %s (run %s): %s", service, job_id, run_id, reason)
        return True


def file_stem(run_id: str) -> str:
    """A readable, bounded file-name stem for a run id plus a short hash of the whole id, so two run ids
    never share a file (``bedrock:ft/1`` → ``bedrock_ft_1-<8 hex>``)."""
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", run_id)[:80]
    return f"{readable}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"


class JobLog:
    """A monitored job's audit trail on disk, in ``dir``, appended as the monitor goes (never rewritten):

    - ``<run>.metrics.jsonl``: every metric event polled (the metric-event JSON), written after each poll;
    - ``<run>.actions.jsonl``: every issue the monitor handled (``{"kind": "issue", "origin", "alert"}``)
      and every recovery action (``{"kind": "action", "action": "auto_stop", "reason", "alert_id",
      "result": "requested" | "failed" | "already_requested", "detail"}``), each with a ``ts``.
    """

    def __init__(self, dir: str | os.PathLike, run_id: str):
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = file_stem(run_id)
        self.metrics_path = self.dir / f"{stem}.metrics.jsonl"
        self.actions_path = self.dir / f"{stem}.actions.jsonl"
        self._lock = threading.Lock()

    def metrics(self, events: list[MetricEvent]) -> None:
        if not events:
            return
        with self._lock, open(self.metrics_path, "ab") as f:
            f.write(b"".join(e.to_json() + b"\n" for e in events))

    def issue(self, alert: Alert, origin: str) -> None:
        self._action_line({"kind": "issue", "origin": origin, "alert": alert.to_dict()})

    def action(self, action: str, *, reason: str, alert_id: str, result: str, detail: str = "") -> None:
        self._action_line({"kind": "action", "action": action, "reason": reason, "alert_id": alert_id,
                           "result": result, "detail": detail})

    def _action_line(self, doc: dict[str, Any]) -> None:
        line = json.dumps({"ts": time.time(), **doc}, allow_nan=False, default=str) + "\n"
        with self._lock, open(self.actions_path, "a") as f:
            f.write(line)


class JobPoller(Protocol):
    """What :class:`JobMonitor` needs from a poller."""

    run_id: str
    status: str | None

    def poll(self) -> list[MetricEvent]: ...

    @property
    def finished(self) -> bool: ...


@dataclass
class MonitorResult:
    """How a monitored job ended, and what was seen on the way."""

    run_id: str
    status: str | None
    events: list[MetricEvent] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    stop_reason: str | None = None


class JobMonitor:
    """Poll a managed job until it ends; emit its events, run detectors, auto-stop on a critical alert.

    Args:
        poller: a Bedrock or SageMaker poller.
        interval: seconds between polls; doubled (up to ``max_interval``) while AWS throttles or fails.
        emit: called with every event (e.g. the Kafka emitter's ``emit`` keyed by run id).
        suite: detectors to run in-process on the events; ``None`` runs none here.
        stopper: stops the job on an alert of ``stop_severity`` or worse; ``None`` never stops.
        on_alert: called with every in-process alert (and with those passed to :meth:`handle_alert`).
        timeout: give up after this many seconds (``None``: wait for the job to end).
        log_dir: keep the job's :class:`JobLog` (metrics and issues/recovery actions, JSONL) in this folder.
    """

    def __init__(self, poller: JobPoller, *, interval: float = 30.0, max_interval: float = 300.0,
                 emit: Callable[[MetricEvent], None] | None = None, suite: DetectorSuite | None = None,
                 stopper: JobStopper | None = None, stop_severity: str = "critical",
                 on_alert: Callable[[Alert], None] | None = None, timeout: float | None = None,
                 log_dir: str | os.PathLike | None = None):
        self.poller = poller
        self.job_log = JobLog(log_dir, poller.run_id) if log_dir is not None else None
        self.interval = interval
        self.max_interval = max(max_interval, interval)
        self.emit = emit
        self.suite = suite
        self.driver = RunDriver(suite) if suite is not None else None
        self.stopper = stopper
        self.stop_rank = severity_rank(stop_severity)
        self.on_alert = on_alert
        self.timeout = timeout
        self.result = MonitorResult(run_id=poller.run_id, status=None)
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._seen: set[str] = set()

    def handle_alert(self, alert: Alert, origin: str = "detectors in-process") -> None:
        """Record an alert for this run; stop the job when it is firing and severe enough."""
        with self._lock:
            if alert.run_id != self.poller.run_id or alert.alert_id in self._seen:
                return  # another run's, or the same alert from the topic and from the in-process detectors
            self._seen.add(alert.alert_id)
            self.result.alerts.append(alert)
        if self.job_log is not None:
            self.job_log.issue(alert, origin)
        if self.on_alert is not None:
            self.on_alert(alert)
        if self.stopper is None or alert.status != "firing" or alert.rank < self.stop_rank:
            return
        reason = (f"{alert.severity} {alert.alert_type} at step {alert.step} ({origin}): {alert.message}")
        run_id = self.poller.run_id
        sent = self.stopper.stop(run_id, reason)
        if self.job_log is not None:
            failure = self.stopper.failures.get(run_id) if not sent else None
            result = "requested" if sent else "failed" if failure else "already_requested"
            self.job_log.action("auto_stop", reason=reason, alert_id=alert.alert_id, result=result,
                                detail=failure or "")
        if sent:
            self.result.stop_reason = reason
            self._wake.set()  # poll again now to see the job stop

    def run(self) -> MonitorResult:
        """Poll until the poller is finished; raise :class:`PollerError` on errors that retries cannot fix."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        delay = self.interval
        while True:
            try:
                events = self.poller.poll()
                delay = self.interval
            except Exception as exc:  # noqa: BLE001 — classified below; fatal ones end the monitor
                kind = error_kind(exc)
                if kind == "fatal":
                    if isinstance(exc, PollerError):
                        raise
                    raise PollerError(describe_error(exc, f"polling {self.poller.run_id}")) from None
                delay = min(delay * 2, self.max_interval)
                what = f"polling {self.poller.run_id}" + (" (throttled)" if kind == "throttle" else "")
                log.warning("%s; next poll in %.0f s", describe_error(exc, what), delay)
                events = []
            if self.job_log is not None:
                self.job_log.metrics(events)
            for event in events:
                self.result.events.append(event)
                if self.emit is not None:
                    self.emit(event)
                if self.driver is not None:
                    for alert in self.driver.feed([event]):
                        self.handle_alert(alert)
            self.result.status = self.poller.status
            if self.poller.finished:
                return self.result
            if deadline is not None and time.monotonic() >= deadline:
                log.warning("monitor of %s timed out with the job %s", self.poller.run_id, self.poller.status)
                return self.result
            self._wake.wait(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))
            self._wake.clear()
