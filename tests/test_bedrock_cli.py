"""``lossguard bedrock mini-run`` and ``run --auto-stop`` as real subprocesses against moto (and a broker)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.aws_fixtures import *  # noqa: F403 — moto fixtures
from tests.aws_fixtures import ROLE_ARN, AwsEnv
from tests.conftest import collect_alerts
from tests.test_bedrock_poller import TRAIN_CSV, diverging, healthy, train_csv

ROOT = Path(__file__).resolve().parent.parent


def write_config(tmp_path: Path, aws: AwsEnv, records: int = 500, **extra) -> Path:
    aws.client("s3").create_bucket(Bucket="data")
    aws.put_text("s3://data/sets/train.jsonl",
                 "".join(f'{{"prompt": "question {i}", "completion": "answer {i}"}}\n' for i in range(records)))
    cfg = {"job_name": "ft-cli", "base_model_id": "amazon.titan-text-lite-v1:0:4k",
           "training_data_path": "s3://data/sets/train.jsonl", "output_data_path": "s3://data/out/",
           "role_arn": ROLE_ARN, "hyperparameters": {"epochCount": "2", "batchSize": "4",
                                                     "learningRate": "0.00001", "learningRateWarmupSteps": "50"},
           **extra}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(cfg))
    return path


def bedrock_cli(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stream_app", "bedrock", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_job(aws: AwsEnv, contains: str, proc: subprocess.Popen, timeout: float = 30) -> str:
    from moto.backends import get_backend

    from tests.aws_fixtures import ACCOUNT, REGION

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = get_backend("bedrock")[ACCOUNT][REGION].model_customization_jobs
        names = [n for n in jobs if contains in n]
        if names:
            return names[0]
        if proc.poll() is not None:
            raise AssertionError("the CLI ended before creating a job: " + "".join(proc.communicate()))
        time.sleep(0.1)
    raise AssertionError(f"no job containing {contains!r} was created")


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the CLI did not end:\n{out}\n{err}") from None
    return proc.returncode, out, err


@pytest.mark.parametrize("healthy_run", [True, False], ids=["go", "no-go"])
def test_mini_run_rehearsal(tmp_path: Path, aws: AwsEnv, healthy_run: bool):
    path = write_config(tmp_path, aws)
    proc = bedrock_cli("mini-run", "--config", str(path), "--steps", "30", "--poll-interval", "0.2",
                       "--final-wait", "20", "--json", env=aws.env(LOSSGUARD_BOOTSTRAP="", LOSSGUARD_DATA_DIR=str(tmp_path)))
    name = wait_for_job(aws, "ft-cli-mini-", proc)
    job = aws.bedrock_job(name)
    assert job.training_data_config["s3Uri"] == "s3://data/sets/train.lossguard-mini-120.jsonl"  # 30 steps x 4
    assert job.hyper_parameters["epochCount"] == "1"
    assert job.hyper_parameters["learningRateWarmupSteps"] == "3"  # 50 >= 30 steps: shortened for the rehearsal
    subset = aws.client("s3").get_object(Bucket="data", Key="sets/train.lossguard-mini-120.jsonl")["Body"].read()
    assert len(subset.splitlines()) == 120

    losses = healthy(30) if healthy_run else diverging(25)
    aws.set_job_status(name, "Completed")
    time.sleep(0.5)  # the CSV lands after the status, as on Bedrock
    aws.put_text(f"s3://data/out/lossguard-mini/model-customization-job-{name}/{TRAIN_CSV}", train_csv(losses))
    code, out, err = finish(proc)
    result = json.loads(out)
    if healthy_run:
        assert code == 0 and result["verdict"] == "go", err
        assert result["summary"]["steps"] == 30
    else:
        assert code == 1 and result["verdict"] == "no-go", err
        assert any("loss_spike" in issue for issue in result["issues"])
        assert any("lower learningRate" in s for s in result["suggestions"])


def test_mini_run_refuses_a_bad_config(tmp_path: Path, aws: AwsEnv):
    path = write_config(tmp_path, aws, hyperparameters={"warmupSteps": "5", "epochCount": 2})
    proc = bedrock_cli("mini-run", "--config", str(path), "--json", env=aws.env(LOSSGUARD_BOOTSTRAP="", LOSSGUARD_DATA_DIR=str(tmp_path)))
    code, out, err = finish(proc)
    assert code == 1 and json.loads(out)["verdict"] == "no-go"
    assert "hyperparameters.warmupSteps" in err and "hyperparameters.epochCount" in err
    assert aws.client("bedrock").list_model_customization_jobs()["modelCustomizationJobSummaries"] == []


def test_run_auto_stop_through_the_broker(tmp_path: Path, aws: AwsEnv, topics, start_worker):
    """Diverging metrics → the stream worker's critical alert on the alert topic → the CLI stops the job."""
    path = write_config(tmp_path, aws)
    aws.put_text(f"s3://data/out/model-customization-job-ft-cli/{TRAIN_CSV}", train_csv(diverging()))
    worker = start_worker()
    proc = bedrock_cli("run", "--config", str(path), "--auto-stop", "--alerts-source", "topic",
                       "--poll-interval", "0.5", "--timeout", "75", "--log-dir", str(tmp_path / "jobs"),
                       env=topics.env(**aws.vars()))
    code, out, err = finish(proc, timeout=90)
    assert code == 1, out + err + worker.log()[-3000:]  # the job ended Stopped
    assert aws.client("bedrock").get_model_customization_job(jobIdentifier="ft-cli")["status"] == "Stopped"
    assert "stopped: critical loss_spike" in out and "(alert topic)" in out
    assert "auto-stop: stop requested for bedrock job ft-cli" in err  # logged with the reason
    assert err.count("auto-stop: stop requested") == 1  # once
    alerts = collect_alerts(topics, lambda a: any(x.severity == "critical" for x in a), timeout=10)
    assert any(a.run_id == "bedrock:ft-cli" and a.severity == "critical" for a in alerts)

    # the audit trail the monitor kept: every polled metric, the issue, and the recovery action it caused
    from detectors.events import decode_metric_event
    from producers.managed import file_stem

    stem = file_stem("bedrock:ft-cli")
    polled = [decode_metric_event(line) for line in (tmp_path / "jobs" / f"{stem}.metrics.jsonl").read_text().splitlines()]
    losses = [e.metrics["loss"] for e in polled if "loss" in e.metrics]
    written = diverging()
    assert losses and losses == pytest.approx(written[:len(losses)])  # the CSV's losses, in order
    assert any(e.tags.get("job_status") == "Stopped" for e in polled)
    lines = [json.loads(x) for x in (tmp_path / "jobs" / f"{stem}.actions.jsonl").read_text().splitlines()]
    actions = [x for x in lines if x["kind"] == "action"]
    assert [(a["action"], a["result"]) for a in actions] == [("auto_stop", "requested")]
    cause = next(x for x in lines if x["kind"] == "issue" and x["alert"]["alert_id"] == actions[0]["alert_id"])
    assert cause["alert"]["severity"] == "critical" and cause["origin"] == "alert topic"
    assert lines.index(cause) < lines.index(actions[0]) and "loss_spike" in actions[0]["reason"]
