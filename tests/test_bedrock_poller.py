"""The Bedrock poller against moto: S3 metric files read incrementally, job status events, auto-stop."""

from __future__ import annotations

import math
import random

import pytest
from botocore.exceptions import ClientError

from detectors import DetectorSuite, canonical_name
from producers.bedrock import BedrockJobPoller, S3MetricFiles, create_job, verdict
from producers.managed import JobMonitor, JobStopper, PollerError, error_kind
from tests.aws_fixtures import *  # noqa: F403 — moto fixtures
from tests.aws_fixtures import ROLE_ARN, AwsEnv

CONFIG = {"job_name": "ft-1", "base_model_id": "amazon.titan-text-lite-v1:0:4k",
          "training_data_path": "s3://data/train.jsonl", "output_data_path": "s3://data/out/",
          "role_arn": ROLE_ARN, "hyperparameters": {"epochCount": "2", "batchSize": "4",
                                                    "learningRate": "0.00001", "learningRateWarmupSteps": "5"}}
TRAIN_CSV = "training_artifacts/step_wise_training_metrics.csv"
VAL_CSV = "validation_artifacts/post_fine_tuning_validation/validation/validation_metrics.csv"


def train_csv(losses: list[float], start: int = 1) -> str:
    rows = ["step_number,epoch_number,training_loss,perplexity"]
    rows += [f"{start + i},{(start + i) // 50},{x},{math.exp(min(x, 50))}" for i, x in enumerate(losses)]
    return "\n".join(rows) + "\n"


def healthy(n: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [round(2.5 - 1.2 * i / n + rng.gauss(0, 0.02), 4) for i in range(n)]


def diverging(n: int = 40) -> list[float]:
    return healthy(n) + [6.0, 15.0, 40.0, 120.0, 400.0]


@pytest.fixture
def job(aws: AwsEnv) -> str:
    aws.client("s3").create_bucket(Bucket="data")
    create_job(aws.client("bedrock"), CONFIG)
    return CONFIG["job_name"]


def test_s3_metric_file_that_grows_is_read_once(aws: AwsEnv, job: str):
    base = f"s3://data/out/model-customization-job-{job}/"
    aws.put_text(base + TRAIN_CSV, train_csv(healthy(10)))
    aws.put_text(base + "training_artifacts/notes.txt", "not metrics")
    aws.put_text("s3://data/out/model-customization-job-other/" + TRAIN_CSV, train_csv([9.0] * 50))
    files = S3MetricFiles(aws.client("s3"), "s3://data/out/", job_token=job)

    rows = files.poll()
    assert sorted(rows) == list(range(1, 11))
    # names go through detectors.aliases: training_loss → loss, step_number → the step
    assert set(rows[1]) == {canonical_name("epoch_number"), "loss", "perplexity"}
    gets, read = files.gets, files.bytes_read

    assert files.poll() == {}
    assert (files.gets, files.bytes_read) == (gets, read)  # unchanged ETag: not fetched again

    full = train_csv(healthy(15))
    aws.put_text(base + TRAIN_CSV, full)
    rows = files.poll()
    assert sorted(rows) == list(range(11, 16))  # only the new rows
    assert files.bytes_read == len(full.encode())  # the first 10 rows were not fetched twice
    assert files.gets == gets + 1

    aws.put_text(base + VAL_CSV, "step_number,epoch_number,validation_loss\n15,0,1.7\n")
    assert files.poll() == {15: {canonical_name("epoch_number"): 0.0, "val_loss": 1.7}}

    aws.put_text(base + TRAIN_CSV, train_csv([1.0, 0.9], start=1))  # rewritten shorter: nothing new
    assert files.poll() == {}


def test_bedrock_create_get_list_stop(aws: AwsEnv, job: str):
    bedrock = aws.client("bedrock")
    got = bedrock.get_model_customization_job(jobIdentifier=job)
    assert got["status"] == "InProgress"
    assert got["hyperParameters"] == CONFIG["hyperparameters"]
    assert got["outputDataConfig"]["s3Uri"] == "s3://data/out/"
    names = [s["jobName"] for page in bedrock.get_paginator("list_model_customization_jobs").paginate()
             for s in page["modelCustomizationJobSummaries"]]
    assert names == [job]
    stopper = JobStopper(clients={"bedrock": bedrock})
    assert stopper.stop(f"bedrock:{job}", "test") is True
    assert stopper.stop(f"bedrock:{job}", "again") is False  # once per run
    assert bedrock.get_model_customization_job(jobIdentifier=job)["status"] == "Stopped"
    with pytest.raises(ValueError, match="names no managed job"):
        stopper.stop("my-run", "no job")


def test_poller_status_events_and_rows(aws: AwsEnv, job: str):
    poller = BedrockJobPoller(job, bedrock=aws.client("bedrock"), s3=aws.client("s3"), final_wait=0)
    (event,) = poller.poll()
    assert event.run_id == f"bedrock:{job}"
    assert event.tags["job_status"] == "InProgress" and event.metrics["job_status"] == 0
    assert poller.poll() == []

    aws.put_text(f"s3://data/out/model-customization-job-{job}/{TRAIN_CSV}", train_csv(healthy(5)))
    aws.set_job_status(job, "Failed", "Training data has 3 malformed records")
    events = poller.poll()
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 5]
    assert [e.ts for e in events] == sorted(set(e.ts for e in events))  # strictly increasing
    assert events[0].metrics["loss"] == pytest.approx(healthy(5)[0])
    status = events[-1]
    assert status.tags == {"job_status": "Failed", "failure_message": "Training data has 3 malformed records"}
    assert poller.finished


def test_completed_job_waits_for_its_csv(aws: AwsEnv, job: str):
    poller = BedrockJobPoller(job, bedrock=aws.client("bedrock"), s3=aws.client("s3"), final_wait=30)
    aws.set_job_status(job, "Completed")
    poller.poll()
    assert not poller.finished  # completed, but the CSVs have not landed yet
    aws.put_text(f"s3://data/out/model-customization-job-{job}/{TRAIN_CSV}", train_csv(healthy(30)))
    events = poller.poll()
    assert len(events) == 30 and poller.finished
    v = verdict("Completed", events, [], CONFIG["hyperparameters"], CONFIG["base_model_id"])
    assert v.go, str(v)


def test_monitor_auto_stops_once_on_critical(aws: AwsEnv, job: str):
    aws.put_text(f"s3://data/out/model-customization-job-{job}/{TRAIN_CSV}", train_csv(diverging()))
    bedrock = aws.client("bedrock")
    poller = BedrockJobPoller(job, bedrock=bedrock, s3=aws.client("s3"))
    stopper = JobStopper(clients={"bedrock": bedrock})
    monitor = JobMonitor(poller, interval=0.05, suite=DetectorSuite(), stopper=stopper, timeout=20)
    result = monitor.run()
    assert result.status == "Stopped"
    assert bedrock.get_model_customization_job(jobIdentifier=job)["status"] == "Stopped"
    assert list(stopper.stopped) == [f"bedrock:{job}"]
    assert "critical" in result.stop_reason and "loss_spike" in result.stop_reason
    assert any(a.severity == "critical" for a in result.alerts)
    v = verdict(result.status, result.events, result.alerts, CONFIG["hyperparameters"], CONFIG["base_model_id"])
    assert not v.go and any("lower learningRate" in s for s in v.suggestions)


def test_not_found_ends_the_poll_with_a_clear_message(aws: AwsEnv):
    poller = BedrockJobPoller("no-such-job", bedrock=aws.client("bedrock"), s3=aws.client("s3"))
    with pytest.raises(PollerError, match="ResourceNotFoundException.*check the job id"):
        JobMonitor(poller, interval=0.01, timeout=5).run()


class FlakyPoller:
    """Throttled twice, then a job that ends: the monitor backs off and carries on."""

    run_id = "bedrock:flaky"
    status = None

    def __init__(self) -> None:
        self.calls = 0

    def poll(self):
        self.calls += 1
        if self.calls <= 2:
            raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}},
                              "GetModelCustomizationJob")
        self.status = "Completed"
        return []

    @property
    def finished(self) -> bool:
        return self.status == "Completed"


def test_throttling_backs_off_and_carries_on(caplog):
    poller = FlakyPoller()
    assert error_kind(ClientError({"Error": {"Code": "ThrottlingException"}}, "x")) == "throttle"
    assert error_kind(ClientError({"Error": {"Code": "AccessDeniedException"}}, "x")) == "fatal"
    result = JobMonitor(poller, interval=0.01, timeout=10).run()
    assert result.status == "Completed" and poller.calls == 3
    waits = [r.getMessage() for r in caplog.records if "throttled" in r.getMessage()]
    assert len(waits) == 2 and "next poll in 0 s" in waits[0]
