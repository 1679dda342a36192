"""``lossguard bedrock ...`` — managed fine-tuning jobs (Bedrock; SageMaker through CloudWatch).

    lossguard bedrock validate --config job.json           check the job config before money is spent
    lossguard bedrock get-optimal --model-type ID --dataset-size N     suggested hyperparameters
    lossguard bedrock mini-run --config job.json --steps 100          rehearse on a subset: go / no-go
    lossguard bedrock run --config job.json [--auto-stop]             create the job and monitor it
    lossguard bedrock monitor --job-id ID [--service sagemaker]       attach to an existing job

Monitoring emits the job's metric events to ``<prefix>.metrics`` when a broker is given (``--broker`` or
``LOSSGUARD_BOOTSTRAP``), runs the detectors in-process, and with ``--auto-stop`` follows the alert topic
too; the first critical alert stops the job, once. Bedrock publishes step metrics to S3 only when a job
completes — the rehearsal (``mini-run``) is the early warning for Bedrock.

Exit status: 0 — valid config / go / the job completed; 1 — config errors, no-go, or the job failed, was
stopped or outlived ``--timeout``; 2 — unreadable input, or an AWS error that retrying cannot fix.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from typing import Any

from detectors import Alert, DetectorSuite

__all__ = ["add_parser"]

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


def _print(args: argparse.Namespace, text: str) -> None:
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout, flush=True)


# -- validate / get-optimal ---------------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    from producers.bedrock import count_records, load_job_config, validate_config
    from producers.managed import aws_client, describe_error

    try:
        raw = load_job_config(args.config)
    except ValueError as exc:
        print(f"lossguard: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    size, notes = args.dataset_size, []
    if size is None and not args.offline and str(raw.get("training_data_path", "")).startswith("s3://"):
        try:
            s3 = aws_client("s3", region=args.region or raw.get("region"), retry_mode=args.retry_mode,
                            max_attempts=args.max_attempts)
            size = count_records(s3, raw["training_data_path"])
            notes.append(f"training data: {size} records")
        except Exception as exc:  # noqa: BLE001 — the dataset checks are skipped, with the reason
            notes.append(describe_error(exc, "could not count the training records (pass --dataset-size "
                                        "to run the steps/warmup checks)"))
    issues = validate_config(raw, dataset_size=size)
    errors = [i for i in issues if i.severity == "error"]
    if args.json:
        print(json.dumps({"valid": not errors, "dataset_size": size, "issues": [i.to_dict() for i in issues],
                          "notes": notes}, indent=2))
    else:
        for note in notes:
            print(note)
        for issue in issues:
            print(issue)
        print(f"{args.config}: {'OK' if not errors else 'NOT VALID'} "
              f"({len(errors)} error(s), {len(issues) - len(errors)} warning(s))")
    return EXIT_PROBLEM if errors else EXIT_OK


def cmd_get_optimal(args: argparse.Namespace) -> int:
    from producers.bedrock import suggest_hyperparameters

    try:
        suggestion = suggest_hyperparameters(args.model_type, args.dataset_size)
    except ValueError as exc:
        print(f"lossguard: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(suggestion, indent=2))
    else:
        print(f"{suggestion['model']} ({suggestion['family']}), {args.dataset_size} records:")
        print('  "hyperparameters": ' + json.dumps(suggestion["hyperparameters"]))
        for line in suggestion["rationale"]:
            print(f"  - {line}")
    return EXIT_OK


# -- monitoring ------------------------------------------------------------------------------------------------
class _Streams:
    """Kafka side of a monitor: the metric emitter and the alert-topic follower (when a broker is given)."""

    def __init__(self, args: argparse.Namespace):
        from producers.emitter import Emitter, topic_name
        from stream_app.settings import load_settings

        self.settings = load_settings(args.detectors_config, bootstrap=args.broker, topic_prefix=args.prefix)
        self.bootstrap = self.settings.bootstrap
        self.emitter = None
        if self.bootstrap:
            self.emitter = Emitter(topic_name("metrics", self.settings.topic_prefix), bootstrap=self.bootstrap,
                                   encode=lambda event: event.to_json())
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def emit(self, event: Any) -> None:
        if self.emitter is not None:
            self.emitter.emit(event.run_id, event)

    def follow_alerts(self, monitor: Any, run_id: str, since: float) -> None:
        from stream_app.alerts_cli import read_alerts

        def follow() -> None:
            try:
                for alert in read_alerts(self.bootstrap, self.settings.topic("alerts"), from_beginning=True,
                                         stop=self._done.is_set):
                    if alert.run_id == run_id and alert.ts >= since:
                        monitor.handle_alert(alert, "alert topic")
            except Exception as exc:  # noqa: BLE001 — the in-process detectors still watch the run
                print(f"lossguard: alert topic unavailable ({exc}); in-process detectors only", file=sys.stderr)

        self._thread = threading.Thread(target=follow, name="lossguard-alert-follower", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._done.set()
        if self.emitter is not None:
            self.emitter.close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _monitor(args: argparse.Namespace, poller: Any, *, stopper: Any = None, quiet_events: bool = False) -> Any:
    """Run a JobMonitor over ``poller`` with the Kafka streams, detectors and auto-stop the flags ask for."""
    from producers.managed import JobMonitor
    from stream_app.alerts_cli import format_alert

    streams = _Streams(args)
    source = args.alerts_source
    if not streams.bootstrap:
        _print(args, "no broker given (--broker / LOSSGUARD_BOOTSTRAP): events go to the in-process "
                     "detectors only")
        source = "local"
    suite = DetectorSuite(streams.settings.detector_config) if source in ("local", "both") else None

    def on_alert(alert: Alert) -> None:
        _print(args, format_alert(alert))

    def emit(event: Any) -> None:
        streams.emit(event)
        if "job_status" in event.tags:
            message = event.tags.get("failure_message", "")
            _print(args, f"[{event.run_id}] job status {event.tags['job_status']}" + (f": {message}" if message else ""))

    log_dir = None if args.no_job_log else (args.log_dir or os.path.join(streams.settings.data_dir, "jobs"))
    monitor = JobMonitor(poller, interval=args.poll_interval, emit=emit, suite=suite, stopper=stopper,
                         on_alert=on_alert, timeout=args.timeout, log_dir=log_dir)
    if monitor.job_log is not None:
        _print(args, f"[{poller.run_id}] audit log: {monitor.job_log.metrics_path} and "
                     f"{monitor.job_log.actions_path}")
    started = time.time()
    if source in ("topic", "both"):
        streams.follow_alerts(monitor, poller.run_id, since=started - 1.0)
    try:
        result = monitor.run()
    finally:
        streams.close()
    metrics = sum(1 for e in result.events if "job_status" not in e.tags)
    _print(args, f"[{poller.run_id}] monitor ended: job {result.status}, {metrics} metric event(s), "
                 f"{len(result.alerts)} alert(s)" + (f", stopped: {result.stop_reason}" if result.stop_reason else ""))
    return result


def _make_poller(args: argparse.Namespace, job_id: str, service: str, region: str | None) -> Any:
    from producers.managed import aws_client

    def client(name: str) -> Any:
        return aws_client(name, region=region, retry_mode=args.retry_mode, max_attempts=args.max_attempts)

    if service == "sagemaker":
        from producers.cloudwatch import SageMakerJobPoller

        return SageMakerJobPoller(job_id, run_id=args.run_id, cloudwatch=client("cloudwatch"),
                                  sagemaker=client("sagemaker"), metric_names=args.metric, period=args.period,
                                  delay=args.cloudwatch_delay)
    from producers.bedrock import BedrockJobPoller

    return BedrockJobPoller(job_id, run_id=args.run_id, bedrock=client("bedrock"), s3=client("s3"),
                            final_wait=args.final_wait)


def _stopper(args: argparse.Namespace, poller: Any, region: str | None) -> Any:
    from producers.managed import JobStopper

    if not args.auto_stop:
        return None
    service = poller.service
    client = poller.bedrock if service == "bedrock" else poller.sagemaker
    stopper = JobStopper(clients={service: client}, region=region)
    stopper.track(poller.run_id, service, poller.job_id if service == "bedrock" else poller.job_name)
    return stopper


def _exit_for(result: Any) -> int:
    return EXIT_OK if result.status == "Completed" else EXIT_PROBLEM


def _guard(fn: Any) -> Any:
    """Turn AWS/poller errors into one clear line and exit status 2."""

    def run(args: argparse.Namespace) -> int:
        from producers.managed import PollerError, describe_error, error_kind

        try:
            return fn(args)
        except PollerError as exc:
            print(f"lossguard: error: {exc}", file=sys.stderr)
        except ValueError as exc:
            print(f"lossguard: error: {exc}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 — botocore errors: say which and what to do
            if error_kind(exc) != "fatal" and exc.__class__.__module__.split(".")[0] != "botocore":
                raise
            print(f"lossguard: error: {describe_error(exc, args.bedrock_command)}", file=sys.stderr)
        return EXIT_USAGE

    return run


@_guard
def cmd_monitor(args: argparse.Namespace) -> int:
    poller = _make_poller(args, args.job_id, args.service, args.region)
    return _exit_for(_monitor(args, poller, stopper=_stopper(args, poller, args.region)))


@_guard
def cmd_run(args: argparse.Namespace) -> int:
    from producers.bedrock import create_job, load_job_config, validate_config
    from producers.managed import aws_client

    raw = load_job_config(args.config)
    issues = validate_config(raw)
    for issue in issues:
        _print(args, str(issue))
    if any(i.severity == "error" for i in issues) and not args.force:
        _print(args, "not submitted: fix the errors above (or pass --force to submit anyway)")
        return EXIT_PROBLEM
    region = args.region or raw.get("region")
    bedrock = aws_client("bedrock", region=region, retry_mode=args.retry_mode, max_attempts=args.max_attempts)
    arn = create_job(bedrock, raw)
    _print(args, f"created {arn}")
    poller = _make_poller(args, str(raw["job_name"]), "bedrock", region)
    return _exit_for(_monitor(args, poller, stopper=_stopper(args, poller, region)))


@_guard
def cmd_mini_run(args: argparse.Namespace) -> int:
    from producers.bedrock import (
        create_job,
        family_for,
        load_job_config,
        validate_config,
        verdict,
        write_subset,
    )
    from producers.managed import aws_client

    raw = load_job_config(args.config)
    issues = validate_config(raw)
    errors = [i for i in issues if i.severity == "error"]
    if errors:
        for issue in issues:
            _print(args, str(issue))
        _print(args, "verdict: NO-GO (the config has errors; nothing was submitted)")
        if args.json:
            print(json.dumps({"verdict": "no-go", "issues": [str(i) for i in errors],
                              "suggestions": [], "summary": {"submitted": False}}, indent=2))
        return EXIT_PROBLEM
    region = args.region or raw.get("region")

    def client(name: str) -> Any:
        return aws_client(name, region=region, retry_mode=args.retry_mode, max_attempts=args.max_attempts)

    _, family = family_for(raw["base_model_id"])
    specs = family["hyperparameters"]
    hyper = {k: str(v) for k, v in raw.get("hyperparameters", {}).items()}
    batch = int(float(hyper.get("batchSize", specs.get("batchSize", {}).get("default", 1))))
    s3 = client("s3")
    subset_uri, records = write_subset(s3, raw["training_data_path"], args.steps * batch)
    steps = math.ceil(records / batch)
    _print(args, f"rehearsal data: {records} records ({steps} steps at batchSize {batch}) → {subset_uri}")
    hyper["epochCount"] = "1"
    if "learningRateWarmupSteps" in specs:
        warmup = int(float(hyper.get("learningRateWarmupSteps", specs["learningRateWarmupSteps"]["default"])))
        if warmup >= steps:
            hyper["learningRateWarmupSteps"] = str(max(0, steps // 10))
            _print(args, f"rehearsal warmup shortened from {warmup} to {hyper['learningRateWarmupSteps']} steps "
                         "(the full job keeps its own)")
    name = f"{str(raw['job_name'])[:44]}-mini-{int(time.time())}"
    output = str(raw["output_data_path"]).rstrip("/") + "/lossguard-mini/"
    arn = create_job(client("bedrock"), raw, job_name=name, training_uri=subset_uri, output_uri=output,
                     hyperparameters=hyper)
    _print(args, f"created rehearsal job {arn}; Bedrock publishes its step metrics when it completes")
    poller = _make_poller(args, name, "bedrock", region)
    result = _monitor(args, poller)
    v = verdict(result.status, result.events, result.alerts, hyper, raw["base_model_id"],
                failure_message=poller.failure_message)
    v.summary.update(job=name, records=records, subset=subset_uri)
    print(json.dumps(v.to_dict(), indent=2) if args.json else str(v), flush=True)
    return EXIT_OK if v.go else EXIT_PROBLEM


# -- parser --------------------------------------------------------------------------------------------------
def _aws_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--region", help="AWS region (default: the config's region, AWS_REGION, the profile)")
    p.add_argument("--retry-mode", choices=["standard", "adaptive"], default="standard",
                   help="botocore retry mode (default standard)")
    p.add_argument("--max-attempts", type=int, default=5, help="botocore attempts per call (default 5)")


def _monitor_flags(p: argparse.ArgumentParser) -> None:
    _aws_flags(p)
    p.add_argument("--broker", help="Kafka bootstrap servers (default LOSSGUARD_BOOTSTRAP; none: no streaming)")
    p.add_argument("--prefix", help="topic prefix (default LOSSGUARD_TOPIC_PREFIX or lossguard)")
    p.add_argument("--detectors-config", help="lossguard TOML config for the in-process detectors")
    p.add_argument("--run-id", help="run id of the events (default bedrock:<job> / sagemaker:<job>)")
    p.add_argument("--poll-interval", type=float, default=60.0, help="seconds between polls (default 60)")
    p.add_argument("--timeout", type=float, help="stop monitoring after this many seconds")
    p.add_argument("--final-wait", type=float, default=300.0,
                   help="after a Bedrock job completes, wait this long for its metric CSVs (default 300)")
    p.add_argument("--alerts-source", choices=["local", "topic", "both"], default="both",
                   help="alerts from the in-process detectors, the alert topic, or both (default both)")
    p.add_argument("--json", action="store_true", help="machine-readable result on stdout")
    p.add_argument("--log-dir", help="the job's audit log: metrics and issues/recovery actions as JSONL "
                                     "(default <data_dir>/jobs, data_dir from LOSSGUARD_DATA_DIR or lossguard-data)")
    p.add_argument("--no-job-log", action="store_true", help="keep no audit log on disk")


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    bedrock = sub.add_parser("bedrock", help="managed fine-tuning jobs: validate, rehearse, run, monitor")
    bsub = bedrock.add_subparsers(dest="bedrock_command", required=True)

    p = bsub.add_parser("validate", help="check a job config before money is spent")
    p.add_argument("--config", required=True, help="the job's JSON config")
    p.add_argument("--dataset-size", type=int, help="training records (default: counted from S3)")
    p.add_argument("--offline", action="store_true", help="do not read S3 (skips the dataset-size checks)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _aws_flags(p)
    p.set_defaults(func=cmd_validate)

    p = bsub.add_parser("get-optimal", help="suggested hyperparameters for a base model and dataset size")
    p.add_argument("--model-type", required=True, help="base model id, e.g. anthropic.claude-3-haiku-20240307-v1:0:200k")
    p.add_argument("--dataset-size", type=int, required=True, help="number of training records")
    p.add_argument("--json", action="store_true", help="print the suggestion as JSON")
    p.set_defaults(func=cmd_get_optimal)

    p = bsub.add_parser("mini-run", help="rehearse on a subset sized for --steps; go / no-go")
    p.add_argument("--config", required=True, help="the job's JSON config")
    p.add_argument("--steps", type=int, default=100, help="rehearsal length in optimizer steps (default 100)")
    _monitor_flags(p)
    p.set_defaults(func=cmd_mini_run, auto_stop=False, service="bedrock")

    p = bsub.add_parser("run", help="create the job and monitor it")
    p.add_argument("--config", required=True, help="the job's JSON config")
    p.add_argument("--auto-stop", action="store_true", help="stop the job on the first critical alert")
    p.add_argument("--force", action="store_true", help="submit even when validation finds errors")
    _monitor_flags(p)
    p.set_defaults(func=cmd_run, service="bedrock")

    p = bsub.add_parser("monitor", help="attach to an existing job")
    p.add_argument("--job-id", required=True, help="Bedrock job name or ARN, or SageMaker training job name")
    p.add_argument("--service", choices=["bedrock", "sagemaker"], default="bedrock",
                   help="bedrock (S3 metric CSVs) or sagemaker (CloudWatch metrics); default bedrock")
    p.add_argument("--auto-stop", action="store_true", help="stop the job on the first critical alert")
    p.add_argument("--metric", action="append", help="SageMaker metric name to read (repeatable; default all)")
    p.add_argument("--period", type=int, default=60, help="SageMaker: CloudWatch bin seconds (default 60)")
    p.add_argument("--cloudwatch-delay", type=float, default=60.0,
                   help="SageMaker: leave bins younger than this for the next poll (default 60 s)")
    _monitor_flags(p)
    p.set_defaults(func=cmd_monitor)
