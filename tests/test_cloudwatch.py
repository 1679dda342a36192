"""The SageMaker/CloudWatch poller against moto, and stopping a training job through JobStopper."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from botocore.stub import Stubber

from producers.cloudwatch import DIMENSION, NAMESPACE, SageMakerJobPoller
from producers.managed import JobStopper
from tests.aws_fixtures import *  # noqa: F403 — moto fixtures
from tests.aws_fixtures import ROLE_ARN, AwsEnv

ROOT = Path(__file__).resolve().parent.parent
JOB = "sm-train-1"


def put(cw, name: str, values: list[float], start: datetime, spacing: timedelta, job: str = JOB) -> None:
    cw.put_metric_data(Namespace=NAMESPACE, MetricData=[
        {"MetricName": name, "Dimensions": [{"Name": DIMENSION, "Value": job}], "Value": v,
         "Timestamp": start + i * spacing} for i, v in enumerate(values)])


def create_training_job(aws: AwsEnv) -> None:
    aws.client("sagemaker").create_training_job(
        TrainingJobName=JOB, RoleArn=ROLE_ARN,
        AlgorithmSpecification={"TrainingImage": "123456789012.dkr.ecr.us-east-1.amazonaws.com/train:1",
                                "TrainingInputMode": "File",
                                "MetricDefinitions": [{"Name": "train_loss", "Regex": "loss=([0-9.]+)"}]},
        OutputDataConfig={"S3OutputPath": "s3://data/sm-out/"},
        ResourceConfig={"InstanceType": "ml.g5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
        StoppingCondition={"MaxRuntimeInSeconds": 3600})


def test_put_and_get_metric_data_incrementally(aws: AwsEnv):
    cw = aws.client("cloudwatch")
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=100)
    put(cw, "train_loss", [2.0 - 0.1 * i for i in range(10)], start, timedelta(seconds=1))
    put(cw, "eval_loss", [2.2 - 0.1 * i for i in range(10)], start, timedelta(seconds=1))
    put(cw, "train_loss", [9.0], start, timedelta(seconds=1), job="another-job")
    poller = SageMakerJobPoller(JOB, cloudwatch=cw, sagemaker=False, period=1, delay=0, since=start)

    events = poller.poll()
    metric_events = [e for e in events if "job_status" not in e.metrics]
    assert [e.step for e in metric_events] == list(range(1, 11))
    assert metric_events[0].metrics == {"loss": 2.0, "val_loss": 2.2}  # names through detectors.aliases
    assert [e.ts for e in metric_events] == sorted(e.ts for e in metric_events)
    assert metric_events[0].run_id == f"sagemaker:{JOB}"
    assert poller.poll() == []  # nothing new

    second = datetime.now(UTC).replace(microsecond=0)
    put(cw, "train_loss", [0.9, 0.8], second + timedelta(milliseconds=100), timedelta(milliseconds=300))
    time.sleep(1.2)
    new = poller.poll()
    assert [e.step for e in new] == [11]
    assert new[0].metrics["loss"] == pytest.approx(0.85)  # one 1-second bin, averaged


def test_training_job_status_and_final_read(aws: AwsEnv):
    create_training_job(aws)
    cw = aws.client("cloudwatch")
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=20)
    put(cw, "train_loss", [2.0, 1.8, 1.7, 1.65], start, timedelta(minutes=1))
    poller = SageMakerJobPoller(JOB, cloudwatch=cw, sagemaker=aws.client("sagemaker"), since=start)
    events = poller.poll()
    assert [e.metrics.get("loss") for e in events[:4]] == [2.0, 1.8, 1.7, 1.65]
    assert events[-1].tags["job_status"] == "Completed"  # moto's training jobs are born completed
    assert not poller.finished
    assert poller.poll() == [] and poller.finished


def test_sagemaker_stop_goes_through_the_job_stopper(aws: AwsEnv):
    sagemaker = aws.client("sagemaker")  # moto has no stop_training_job: stub that one call
    with Stubber(sagemaker) as stub:
        stub.add_response("stop_training_job", {}, {"TrainingJobName": JOB})
        stopper = JobStopper(clients={"sagemaker": sagemaker})
        assert stopper.stop(f"sagemaker:{JOB}", "critical loss_spike") is True
        assert stopper.stop(f"sagemaker:{JOB}", "again") is False
        stub.assert_no_pending_responses()


def test_cli_monitor_sagemaker(aws: AwsEnv):
    create_training_job(aws)  # moto's job is born Completed: its datapoints come after its creation
    put(aws.client("cloudwatch"), "train_loss", [2.0, 1.8], datetime.now(UTC), timedelta(0))
    out = subprocess.run([sys.executable, "-m", "stream_app", "bedrock", "monitor", "--service", "sagemaker",
                          "--job-id", JOB, "--poll-interval", "0.1", "--timeout", "20"],
                         cwd=ROOT, env=aws.env(LOSSGUARD_BOOTSTRAP=""), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"[sagemaker:{JOB}] job status Completed" in out.stdout
    assert "monitor ended: job Completed, 1 metric event(s)" in out.stdout  # one 60-second bin


def test_cli_monitor_unknown_job_is_a_clear_error(aws: AwsEnv):
    out = subprocess.run([sys.executable, "-m", "stream_app", "bedrock", "monitor", "--job-id", "nope",
                          "--poll-interval", "0.1", "--max-attempts", "1"],
                         cwd=ROOT, env=aws.env(LOSSGUARD_BOOTSTRAP=""), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "ResourceNotFoundException" in out.stderr and "check the job id" in out.stderr
    assert "testing" not in out.stderr + out.stdout  # no credentials in the output
