"""Bedrock job-config checks and hyperparameter suggestions, on every documented model family."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from producers.bedrock import family_for, model_table, suggest_hyperparameters, validate_config
from tests.aws_fixtures import *  # noqa: F403 — moto fixtures
from tests.aws_fixtures import ROLE_ARN, AwsEnv

ROOT = Path(__file__).resolve().parent.parent

#: one real base model id per family (the ids Bedrock lists for customization)
MODELS = {
    "titan-text-lite-express": "amazon.titan-text-express-v1:0:8k",
    "titan-text-premier": "amazon.titan-text-premier-v1:0:32k",
    "nova": "amazon.nova-lite-v1:0:300k",
    "claude-3-haiku": "anthropic.claude-3-haiku-20240307-v1:0:200k",
    "llama-3": "meta.llama3-1-8b-instruct-v1:0:128k",
    "cohere-command": "cohere.command-text-v14:7:4k",
    "cohere-command-light": "cohere.command-light-text-v14:7:4k",
}


def good_config(model: str, **hyper: str) -> dict:
    suggestion = suggest_hyperparameters(model, 1000)["hyperparameters"]
    return {"job_name": "ft-job-1", "base_model_id": model, "training_data_path": "s3://data/train.jsonl",
            "output_data_path": "s3://data/out/", "role_arn": ROLE_ARN,
            "hyperparameters": {**suggestion, **hyper}}


def keys(issues, severity="error"):
    return {i.key for i in issues if i.severity == severity}


def test_every_family_in_the_table_is_tested():
    assert set(model_table()["families"]) == set(MODELS)
    for family, model in MODELS.items():
        assert family_for(model)[0] == family
        assert family_for(f"arn:aws:bedrock:us-east-1::foundation-model/{model}")[0] == family


@pytest.mark.parametrize("family", sorted(MODELS))
def test_good_config_passes(family):
    issues = validate_config(good_config(MODELS[family]), dataset_size=1000)
    assert issues == [], [str(i) for i in issues]


@pytest.mark.parametrize("family", sorted(MODELS))
def test_each_bad_kind_is_caught_with_its_key(family):
    model = MODELS[family]
    specs = model_table()["families"][family]["hyperparameters"]
    key, spec = next((k, s) for k, s in specs.items() if s["max"] > s["min"])

    # unknown key, with Bedrock's name in the fix when it is an alias
    issues = validate_config(good_config(model, warmupSteps="5"))
    (issue,) = [i for i in issues if i.key == "hyperparameters.warmupSteps"]
    if "learningRateWarmupSteps" in specs:
        assert "learningRateWarmupSteps" in issue.message and "rename" in issue.message
    else:
        assert "takes no 'learningRateWarmupSteps'" in issue.message

    # a non-string value (boto3 would reject it)
    cfg = good_config(model)
    cfg["hyperparameters"]["epochCount"] = 1
    issues = validate_config(cfg)
    assert "hyperparameters.epochCount" in keys(issues)
    assert 'write "1"' in next(i.message for i in issues if i.key == "hyperparameters.epochCount")

    # out of range, both sides
    for bad in (spec["max"] * 2 + 1, spec["min"] - 1):
        text = str(int(bad)) if spec["type"] == "integer" else f"{bad:g}"
        issues = validate_config(good_config(model, **{key: text}))
        assert f"hyperparameters.{key}" in keys(issues), (key, text)
        assert "range" in next(i.message for i in issues if i.key == f"hyperparameters.{key}")

    # not a number / not an integer
    issues = validate_config(good_config(model, epochCount="2.5"))
    assert "hyperparameters.epochCount" in keys(issues)

    # batchSize of another family / Nova has none
    if "batchSize" not in specs:
        issues = validate_config(good_config(model, batchSize="8"))
        assert "hyperparameters.batchSize" in keys(issues)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_dataset_checks(family):
    model = MODELS[family]
    specs = model_table()["families"][family]["hyperparameters"]
    if "batchSize" in specs and specs["batchSize"]["max"] >= 8:
        top = str(specs["batchSize"]["max"])
        issues = validate_config(good_config(model, batchSize=top), dataset_size=specs["batchSize"]["max"] * 3)
        assert "hyperparameters.batchSize" in keys(issues, "warning")
    if "learningRateWarmupSteps" in specs and "batchSize" in specs:
        warm = str(specs["learningRateWarmupSteps"]["max"])
        issues = validate_config(good_config(model, learningRateWarmupSteps=warm, epochCount="1",
                                             batchSize=str(specs["batchSize"]["max"])), dataset_size=10)
        assert "hyperparameters.learningRateWarmupSteps" in keys(issues)
        assert "never reaches" in next(i.message for i in issues
                                       if i.key == "hyperparameters.learningRateWarmupSteps")
    if family == "nova":
        issues = validate_config(good_config(model, learningRateWarmupSteps="100"), dataset_size=320)
        assert "hyperparameters.learningRateWarmupSteps" in keys(issues, "warning")
    if "learningRate" in specs:
        default = specs["learningRate"]["default"]
        far = default * 20 if default * 20 <= specs["learningRate"]["max"] else default / 20
        if specs["learningRate"]["min"] <= far <= specs["learningRate"]["max"]:
            issues = validate_config(good_config(model, learningRate=f"{far:g}"))
            assert "hyperparameters.learningRate" in keys(issues, "warning")


def test_top_level_checks():
    cfg = good_config(MODELS["llama-3"])
    cfg.update(training_data_path="/local/train.jsonl", role_arn="my-role", job_name="bad name!",
               enable_peft=True, lora_rank=-3, jobName="x")
    del cfg["output_data_path"]
    issues = validate_config(cfg)
    assert {"training_data_path", "role_arn", "job_name", "output_data_path", "lora_rank", "jobName"} <= keys(issues)
    assert {"enable_peft", "lora_rank"} <= keys(issues, "warning")
    assert "did you mean 'job_name'" in next(i.message for i in issues if i.key == "jobName")
    assert validate_config({**good_config(MODELS["nova"]), "base_model_id": "openai.gpt-9"})[0].key == "base_model_id"


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("size", [40, 1000, 50_000])
def test_suggestions_validate_and_are_strings(family, size):
    suggestion = suggest_hyperparameters(MODELS[family], size)
    hyper = suggestion["hyperparameters"]
    assert set(hyper) == set(model_table()["families"][family]["hyperparameters"])
    assert all(isinstance(v, str) for v in hyper.values())
    cfg = good_config(MODELS[family])
    cfg["hyperparameters"] = hyper
    assert keys(validate_config(cfg, dataset_size=size)) == set()
    assert suggestion["rationale"]


def test_suggestions_follow_the_dataset_size():
    small = suggest_hyperparameters(MODELS["claude-3-haiku"], 200)["hyperparameters"]
    large = suggest_hyperparameters(MODELS["claude-3-haiku"], 50_000)["hyperparameters"]
    assert int(small["batchSize"]) < int(large["batchSize"]) == 32
    assert int(small["epochCount"]) > int(large["epochCount"])
    nova = suggest_hyperparameters("amazon.nova-micro-v1:0:128k", 6400)["hyperparameters"]
    assert nova["learningRateWarmupSteps"] == "10"  # 6400 / 640, as AWS suggests for Micro
    with pytest.raises(ValueError, match="known prefixes"):
        suggest_hyperparameters("openai.gpt-9", 100)


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stream_app", "bedrock", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_validate_and_get_optimal(tmp_path: Path, aws: AwsEnv):
    s3 = aws.client("s3")
    s3.create_bucket(Bucket="data")
    aws.put_text("s3://data/train.jsonl", "".join(f'{{"prompt": "q{i}", "completion": "a{i}"}}\n' for i in range(30)))
    cfg = good_config(MODELS["titan-text-lite-express"], batchSize="8", warmupSteps="5")
    path = tmp_path / "job.json"
    path.write_text(json.dumps(cfg))
    out = run_cli("validate", "--config", str(path), "--json", env=aws.env())
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout)
    assert report["dataset_size"] == 30 and not report["valid"]
    found = {i["key"] for i in report["issues"]}
    assert {"hyperparameters.warmupSteps", "hyperparameters.batchSize"} <= found

    del cfg["hyperparameters"]["warmupSteps"]
    cfg["hyperparameters"].update(batchSize="1", learningRateWarmupSteps="5")
    path.write_text(json.dumps(cfg))
    out = run_cli("validate", "--config", str(path), env=aws.env())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK" in out.stdout

    out = run_cli("validate", "--config", str(tmp_path / "missing.json"), "--offline")
    assert out.returncode == 2 and "no such file" in out.stderr

    out = run_cli("get-optimal", "--model-type", MODELS["claude-3-haiku"], "--dataset-size", "1000", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["hyperparameters"]["learningRateMultiplier"] == "1"
