"""Amazon Bedrock model customization: check a job config, suggest hyperparameters, poll a job's metrics.

Three parts, in the order a user meets them:

* **Config checks** — :func:`load_job_config` reads the JSON file users write (``job_name``,
  ``base_model_id``, ``training_data_path``, ``output_data_path``, ``role_arn``, ``hyperparameters`` …)
  and :func:`validate_config` checks it against the documented keys, ranges and defaults of the base
  model's family (``bedrock_models.json``, the one table): unknown keys (``warmupSteps`` → Bedrock's key is
  ``learningRateWarmupSteps``), non-string values (boto3 rejects them), out-of-range values, warmup longer
  than the job, too few steps per epoch, a learning rate far from the family default.
  :func:`suggest_hyperparameters` proposes values from the defaults and the dataset size.
* **Polling** — :class:`BedrockJobPoller` turns ``get_model_customization_job`` status transitions into
  ``job_status`` events (Failed/Stopped carry the failure message) and reads the metric CSVs under the
  job's S3 output prefix with :class:`S3MetricFiles`: files are matched by name suffix, read with byte
  ranges from where the last read ended and skipped while their ETag is unchanged, and only rows with a new
  step become events.
* **Rehearsal** — :func:`write_subset` and :func:`verdict` serve ``lossguard bedrock mini-run``.

Bedrock publishes the step-wise metric CSVs (``step_number, epoch_number, training_loss, perplexity``;
validation ``validation_loss``) to S3 when a job *completes*; during the run only the status changes. That is
why the mini-run rehearsal — a short job on a subset, replayed through the detectors — is the early warning.
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from detectors.alerts import Alert, severity_rank
from detectors.aliases import canonical_name
from detectors.events import MetricEvent

from .managed import TERMINAL_STATUSES, aws_client, status_event

__all__ = [
    "Issue", "JobConfig", "load_job_config", "model_table", "family_for", "validate_config",
    "suggest_hyperparameters", "create_job", "S3MetricFiles", "BedrockJobPoller", "parse_s3_uri",
    "count_records", "write_subset", "Verdict", "verdict",
]

log = logging.getLogger("lossguard.bedrock")

#: fewer optimizer steps per epoch than this and the loss curve says little (and warmup eats the epoch)
MIN_STEPS_PER_EPOCH = 10
#: a learning rate more than this factor from the family default gets a warning
LR_FACTOR_WARNING = 10.0

_CONFIG_KEYS = {
    "job_name": "name of the customization job (letters, digits, '-', '+', '.'; at most 63)",
    "base_model_id": "base model id, e.g. amazon.titan-text-lite-v1:0:4k",
    "training_data_path": "s3:// URI of the training JSONL",
    "output_data_path": "s3:// prefix for the job's output",
    "role_arn": "IAM role Bedrock assumes (arn:aws:iam::<account>:role/<name>)",
    "hyperparameters": "object of Bedrock hyperparameter → string value",
    "validation_data_path": "optional s3:// URI (or list of URIs) of validation JSONL",
    "custom_model_name": "optional name of the resulting custom model (default <job_name>-model)",
    "customization_type": "optional FINE_TUNING (default) or CONTINUED_PRE_TRAINING",
    "region": "optional AWS region",
    "enable_peft": "optional; Bedrock picks the fine-tuning method itself",
    "peft_method": "optional; Bedrock picks the fine-tuning method itself",
    "lora_rank": "optional; Bedrock picks the fine-tuning method itself",
}
_REQUIRED = ("job_name", "base_model_id", "training_data_path", "output_data_path", "role_arn")
_JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9+\-.])*$")
_ROLE_ARN = re.compile(r"^arn:aws(-[a-z]+)*:iam::\d{12}:role/.+$")


# ---------------------------------------------------------------------------------------------------------
# config checks


@dataclass(frozen=True)
class Issue:
    """One finding about a job config: ``error`` blocks the job, ``warning`` is worth a look."""

    severity: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity.upper():7} {self.key}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "key": self.key, "message": self.message}


@dataclass
class JobConfig:
    """A job config as users write it (see ``_CONFIG_KEYS``); hyperparameter values are strings."""

    job_name: str
    base_model_id: str
    training_data_path: str
    output_data_path: str
    role_arn: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    validation_data_path: str | list[str] | None = None
    custom_model_name: str | None = None
    customization_type: str = "FINE_TUNING"
    region: str | None = None
    enable_peft: Any = None
    peft_method: Any = None
    lora_rank: Any = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> JobConfig:
        known = {k: raw[k] for k in _CONFIG_KEYS if k in raw}
        for key in _REQUIRED:
            known.setdefault(key, "")
        known["hyperparameters"] = dict(raw.get("hyperparameters") or {})
        return cls(**known)


def load_job_config(path: str) -> dict[str, Any]:
    """The raw JSON object of a job config file; ValueError with the file and reason when unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; pass --config with the job's JSON config") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of job settings, got {type(raw).__name__}")
    return raw


@lru_cache(maxsize=1)
def model_table() -> dict[str, Any]:
    """The per-family hyperparameter table (``producers/bedrock_models.json``)."""
    return json.loads(resources.files("producers").joinpath("bedrock_models.json").read_text())


def _model_id(base_model_id: str) -> str:
    # accept ARNs: arn:aws:bedrock:us-east-1::foundation-model/amazon.titan-text-lite-v1:0:4k
    return base_model_id.rsplit("/", 1)[-1]


def family_for(base_model_id: str) -> tuple[str, dict[str, Any]]:
    """``(family name, family entry)`` for a base model id or ARN; ValueError listing the known families."""
    model = _model_id(base_model_id)
    for name, family in model_table()["families"].items():
        if any(model.startswith(prefix) for prefix in family["match"]):
            return name, family
    known = ", ".join(p for f in model_table()["families"].values() for p in f["match"])
    raise ValueError(f"base model {base_model_id!r} is not a customizable family lossguard knows "
                     f"(known prefixes: {known})")


def _fmt(x: float) -> str:
    return f"{x:g}"


def _parse_value(raw: str, spec: Mapping[str, Any]) -> float:
    value = float(raw)
    if spec["type"] == "integer" and not value.is_integer():
        raise ValueError
    if not math.isfinite(value):
        raise ValueError
    return value


def _check_uri(issues: list[Issue], key: str, value: Any) -> None:
    if not isinstance(value, str) or not value.startswith("s3://") or len(value) <= len("s3://"):
        issues.append(Issue("error", key, f"{value!r} is not an s3:// URI; write e.g. s3://my-bucket/path"))


def validate_config(raw: Mapping[str, Any], dataset_size: int | None = None) -> list[Issue]:
    """Every problem found in a job config (errors first); an empty list means the job can be submitted.

    ``dataset_size`` (training records) enables the checks that need it: steps per epoch, warmup longer
    than the job.
    """
    issues: list[Issue] = []
    for key in raw:
        if key not in _CONFIG_KEYS:
            close = difflib.get_close_matches(key, _CONFIG_KEYS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(_CONFIG_KEYS)}"
            issues.append(Issue("error", key, f"unknown config key; {hint}"))
    for key in _REQUIRED:
        if not raw.get(key):
            issues.append(Issue("error", key, f"missing; add the {_CONFIG_KEYS[key]}"))
    name = raw.get("job_name")
    if name and (not isinstance(name, str) or not _JOB_NAME.match(name) or len(name) > 63):
        issues.append(Issue("error", "job_name", f"{name!r} is not a valid job name: use letters, digits, "
                            "'-', '+' and '.', starting with a letter or digit, at most 63 characters"))
    for key in ("training_data_path", "output_data_path"):
        if raw.get(key):
            _check_uri(issues, key, raw[key])
    validation = raw.get("validation_data_path")
    for uri in ([validation] if isinstance(validation, str) else validation or []):
        _check_uri(issues, "validation_data_path", uri)
    role = raw.get("role_arn")
    if role and (not isinstance(role, str) or not _ROLE_ARN.match(role)):
        issues.append(Issue("error", "role_arn", f"{role!r} is not an IAM role ARN; write "
                            "arn:aws:iam::<12-digit account>:role/<role name>"))
    ctype = raw.get("customization_type", "FINE_TUNING")
    if ctype not in ("FINE_TUNING", "CONTINUED_PRE_TRAINING"):
        issues.append(Issue("error", "customization_type",
                            f"{ctype!r}: use FINE_TUNING or CONTINUED_PRE_TRAINING"))
    for key in ("enable_peft", "peft_method", "lora_rank"):
        if raw.get(key) not in (None, False, ""):
            issues.append(Issue("warning", key, "Bedrock's API has no PEFT/LoRA setting (the service picks "
                                "the method); this key is not sent — remove it or keep it for your records"))
    if raw.get("lora_rank") not in (None, "") and not (isinstance(raw["lora_rank"], int) and raw["lora_rank"] > 0):
        issues.append(Issue("error", "lora_rank", f"{raw['lora_rank']!r}: expected a positive integer"))
    hyper = raw.get("hyperparameters")
    if hyper is None:
        hyper = {}
    if not isinstance(hyper, Mapping):
        issues.append(Issue("error", "hyperparameters", "expected an object of name → string value"))
        hyper = {}
    if raw.get("base_model_id"):
        try:
            _family_name, family = family_for(str(raw["base_model_id"]))
        except ValueError as exc:
            issues.append(Issue("error", "base_model_id", str(exc)))
        else:
            issues += _check_hyperparameters(hyper, family, str(raw["base_model_id"]), dataset_size,
                                             has_validation=bool(validation))
    return sorted(issues, key=lambda i: i.severity != "error")


def _check_hyperparameters(hyper: Mapping[str, Any], family: Mapping[str, Any], model: str,
                           dataset_size: int | None, has_validation: bool) -> list[Issue]:
    issues: list[Issue] = []
    specs: dict[str, Any] = family["hyperparameters"]
    aliases: dict[str, str] = model_table()["key_aliases"]
    values: dict[str, float] = {}
    for key, raw in hyper.items():
        path = f"hyperparameters.{key}"
        if key not in specs:
            target = aliases.get(key)
            if target in specs:
                fix = f"Bedrock's key is {target!r}; rename it"
            elif target:
                fix = f"{family['label']} takes no {target!r}; remove it"
            else:
                close = difflib.get_close_matches(key, specs, n=1)
                fix = (f"did you mean {close[0]!r}?" if close else "remove it") + \
                    f" ({family['label']} takes {', '.join(specs)})"
            issues.append(Issue("error", path, f"unknown hyperparameter for {family['label']}; {fix}"))
            continue
        spec = specs[key]
        if not isinstance(raw, str):
            issues.append(Issue("error", path, f"{raw!r} is a {type(raw).__name__}; Bedrock takes every "
                                f"hyperparameter as a string (boto3 rejects others): write \"{raw}\""))
        try:
            value = _parse_value(str(raw), spec)
        except ValueError:
            issues.append(Issue("error", path, f"{raw!r} is not a valid {spec['type']}; "
                                f"use e.g. \"{_fmt(spec['default'])}\""))
            continue
        if not spec["min"] <= value <= spec["max"]:
            issues.append(Issue("error", path, f"{raw} is outside {family['label']}'s range "
                                f"[{_fmt(spec['min'])}, {_fmt(spec['max'])}]; the default is "
                                f"{_fmt(spec['default'])}"))
            continue
        values[key] = value

    def get(key: str) -> float | None:
        return values.get(key, specs[key]["default"]) if key in specs else None

    lr, lr_spec = values.get("learningRate"), specs.get("learningRate")
    if lr is not None and lr_spec:
        default = lr_spec["default"]
        if lr <= 0 or max(lr / default, default / lr) > LR_FACTOR_WARNING:
            issues.append(Issue("warning", "hyperparameters.learningRate",
                                f"{_fmt(lr)} is more than {LR_FACTOR_WARNING:g}x from {family['label']}'s "
                                f"default {_fmt(default)}; start near the default unless a sweep says otherwise"))
        if has_validation and "cohere" in model:
            issues.append(Issue("warning", "hyperparameters.learningRate", "with a validation dataset AWS "
                                "recommends leaving learningRate unset for Cohere Command"))
    warmup = get("learningRateWarmupSteps")
    if dataset_size is not None and dataset_size > 0:
        batch = get("batchSize")
        epochs = get("epochCount") or 1
        if batch is not None:
            steps_per_epoch = math.ceil(dataset_size / batch)
            total = int(steps_per_epoch * epochs)
            if steps_per_epoch < MIN_STEPS_PER_EPOCH:
                better = max(specs["batchSize"]["min"], dataset_size // MIN_STEPS_PER_EPOCH)
                issues.append(Issue("warning", "hyperparameters.batchSize",
                                    f"{_fmt(batch)} leaves {steps_per_epoch} step(s) per epoch for "
                                    f"{dataset_size} records; use batchSize \"{int(better)}\" or fewer, or "
                                    "add data"))
            if warmup is not None and warmup >= total:
                issues.append(Issue("error", "hyperparameters.learningRateWarmupSteps",
                                    f"{_fmt(warmup)} warmup steps but the job has only {total} steps "
                                    f"({dataset_size} records / batchSize {_fmt(batch)} x {_fmt(epochs)} "
                                    f"epochs): the learning rate never reaches its set value; use "
                                    f"\"{max(0, total // 10)}\""))
        per_step = _nova_records_per_warmup_step(family, model)
        if per_step and warmup is not None:
            advised = max(1, round(dataset_size / per_step))
            if warmup > 2 * advised:
                issues.append(Issue("warning", "hyperparameters.learningRateWarmupSteps",
                                    f"{_fmt(warmup)} is long for {dataset_size} records; AWS suggests "
                                    f"dataset size / {per_step} = \"{advised}\""))
    return issues


def _nova_records_per_warmup_step(family: Mapping[str, Any], model: str) -> int | None:
    table = family.get("warmup_records_per_step") or {}
    return next((n for prefix, n in table.items() if _model_id(model).startswith(prefix)), None)


def suggest_hyperparameters(base_model_id: str, dataset_size: int) -> dict[str, Any]:
    """Suggested hyperparameters (strings, ready for Bedrock) for a dataset size, with the reasoning.

    Starts from the family's documented defaults, then: lowers ``batchSize`` when an epoch would have fewer
    than ``MIN_STEPS_PER_EPOCH * 5`` steps; adds epochs for small datasets (< 500 records) and removes some for
    large ones (> 10 000), as AWS advises; sets warmup to ~5 % of the job (Nova: dataset size / the
    per-model divisor AWS gives), all clipped to the documented ranges.

    >>> s = suggest_hyperparameters("amazon.titan-text-lite-v1:0:4k", 1000)
    >>> s["hyperparameters"]
    {'epochCount': '5', 'batchSize': '1', 'learningRate': '1e-05', 'learningRateWarmupSteps': '250'}
    """
    if dataset_size < 1:
        raise ValueError(f"dataset size must be at least 1 record, got {dataset_size}")
    name, family = family_for(base_model_id)
    specs = family["hyperparameters"]
    values = {k: s["default"] for k, s in specs.items()}
    why: list[str] = [f"{family['label']} defaults from {family['source']}"]

    def clip(key: str, x: float) -> float:
        return min(max(x, specs[key]["min"]), specs[key]["max"])

    if "batchSize" in specs:
        target_steps = MIN_STEPS_PER_EPOCH * 5
        if math.ceil(dataset_size / values["batchSize"]) < target_steps:
            bs = clip("batchSize", 2 ** max(0, int(math.log2(max(1, dataset_size // target_steps)))))
            if bs != values["batchSize"]:
                why.append(f"batchSize {bs:g}: keeps at least ~{target_steps} steps per epoch "
                           f"for {dataset_size} records")
            values["batchSize"] = bs
    if dataset_size < 500:
        values["epochCount"] = clip("epochCount", math.ceil(values["epochCount"] * 1.5))
        why.append(f"epochCount {values['epochCount']:g}: small datasets need more passes to converge")
    elif dataset_size > 10_000:
        values["epochCount"] = clip("epochCount", max(1, values["epochCount"] // 2))
        why.append(f"epochCount {values['epochCount']:g}: large datasets converge in fewer epochs")
    if "learningRateWarmupSteps" in specs:
        per_step = _nova_records_per_warmup_step(family, base_model_id)
        if per_step:
            warm = clip("learningRateWarmupSteps", round(dataset_size / per_step))
            why.append(f"learningRateWarmupSteps {warm:g}: dataset size / {per_step}, as AWS suggests")
        else:
            total = math.ceil(dataset_size / values.get("batchSize", 1)) * values["epochCount"]
            warm = clip("learningRateWarmupSteps", round(0.05 * total))
            why.append(f"learningRateWarmupSteps {warm:g}: ~5% of the job's {total:g} steps")
        values["learningRateWarmupSteps"] = warm
    hyper = {k: (str(int(v)) if specs[k]["type"] == "integer" else _fmt(v)) for k, v in values.items()}
    return {"family": name, "model": base_model_id, "dataset_size": dataset_size, "hyperparameters": hyper,
            "rationale": why}


def create_job(bedrock: Any, raw: Mapping[str, Any], *, job_name: str | None = None,
               training_uri: str | None = None, output_uri: str | None = None,
               hyperparameters: Mapping[str, str] | None = None) -> str:
    """Submit a customization job from a config (with optional overrides); returns the job ARN."""
    cfg = JobConfig.from_dict(raw)
    name = job_name or cfg.job_name
    request: dict[str, Any] = {
        "jobName": name,
        "customModelName": (f"{name}-model" if job_name else cfg.custom_model_name or f"{name}-model")[:63],
        "roleArn": cfg.role_arn,
        "baseModelIdentifier": cfg.base_model_id,
        "customizationType": cfg.customization_type,
        "trainingDataConfig": {"s3Uri": training_uri or cfg.training_data_path},
        "outputDataConfig": {"s3Uri": output_uri or cfg.output_data_path},
        "hyperParameters": {k: str(v) for k, v in (hyperparameters or cfg.hyperparameters).items()},
    }
    if cfg.validation_data_path:
        uris = [cfg.validation_data_path] if isinstance(cfg.validation_data_path, str) else cfg.validation_data_path
        request["validationDataConfig"] = {"validators": [{"s3Uri": u} for u in uris]}
    return bedrock.create_model_customization_job(**request)["jobArn"]


# ---------------------------------------------------------------------------------------------------------
# S3 metric files


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b")``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} has no bucket")
    return bucket, key


@dataclass
class _FileState:
    etag: str = ""
    offset: int = 0
    header: list[str] = field(default_factory=list)
    last_step: int = -1
    #: the last byte read: anything but a newline means the file ended mid-line (or without a final newline)
    tail: bytes = b""


class S3MetricFiles:
    """The metric CSVs under one S3 prefix, read incrementally.

    Each poll lists the prefix; a file whose ETag has not changed is not read again, a file that grew is
    read from the byte where the last read ended (a ``Range`` request), and only rows whose step is beyond
    the last one seen in that file are returned. Files are matched by name ``suffix``; files inside another
    job's ``model-customization-job-<id>/`` folder are skipped when ``job_token`` is given.

    Args:
        s3: a boto3 S3 client.
        uri: ``s3://bucket/prefix`` to search.
        suffix: file-name suffix of a metric CSV (Bedrock writes ``step_wise_training_metrics.csv`` and
            ``validation_metrics.csv``).
        job_token: the job's id (last ARN segment).
    """

    def __init__(self, s3: Any, uri: str, *, suffix: str = "metrics.csv", job_token: str | None = None):
        self.s3 = s3
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.suffix = suffix
        self.job_token = job_token
        self.files: dict[str, _FileState] = {}
        #: GET requests and bytes fetched so far (a grown file is fetched once: only its new bytes)
        self.gets = 0
        self.bytes_read = 0

    def _mine(self, key: str) -> bool:
        if not key.endswith(self.suffix):
            return False
        if self.job_token and "model-customization-job-" in key:
            return f"model-customization-job-{self.job_token}" in key or f"/{self.job_token}/" in key
        return True

    def poll(self) -> dict[int, dict[str, float]]:
        """New rows since the last poll: step → metrics (train and validation rows of a step merged)."""
        rows: dict[int, dict[str, float]] = {}
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", []):
                if self._mine(obj["Key"]):
                    for step, metrics in self._read(obj["Key"], obj["Size"], obj.get("ETag", "")):
                        rows.setdefault(step, {}).update(metrics)
        return rows

    def _read(self, key: str, size: int, etag: str) -> list[tuple[int, dict[str, float]]]:
        state = self.files.setdefault(key, _FileState())
        if etag and etag == state.etag:
            return []
        if size < state.offset or (size == state.offset and state.etag):
            state.offset, state.tail, state.header = 0, b"", []  # rewritten, not grown: re-read; steps dedupe
        if size > state.offset:
            response = self.s3.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={state.offset}-{size - 1}")
            data = response["Body"].read()
            self.gets += 1
            self.bytes_read += len(data)
            state.offset += len(data)
        else:
            data = b""
        state.etag = etag
        if state.tail not in (b"", b"\n") and data and not data.startswith(b"\n"):
            # the last read ended mid-line: the rest of that line belongs to a row already read
            data = data.partition(b"\n")[2]
        state.tail = data[-1:] if data else state.tail
        lines = data.decode("utf-8", errors="replace").splitlines()
        out = []
        for row in csv.reader(lines):
            if not row or not any(cell.strip() for cell in row):
                continue
            if not state.header:
                state.header = [canonical_name(c.strip()) for c in row]
                continue
            parsed = self._row(state.header, row)
            if parsed is None or parsed[0] <= state.last_step:
                continue
            state.last_step = parsed[0]
            out.append(parsed)
        return out

    @staticmethod
    def _row(header: list[str], row: list[str]) -> tuple[int, dict[str, float]] | None:
        metrics: dict[str, float] = {}
        for name, cell in zip(header, row, strict=False):
            try:
                metrics[name] = float(cell)
            except ValueError:
                continue  # an empty or text cell: not logged at this step
        step = metrics.pop("step", None)
        if step is None or not math.isfinite(step):
            return None
        return int(step), metrics


# ---------------------------------------------------------------------------------------------------------
# the poller


class BedrockJobPoller:
    """One Bedrock customization job as metric events.

    Each :meth:`poll` calls ``get_model_customization_job`` (a status change becomes a ``job_status`` event;
    Failed/Stopped carry the failure message), then reads new rows of the metric CSVs under the job's
    output prefix. After a ``Completed`` status it keeps looking for the CSVs for up to ``final_wait``
    seconds (they land when the job completes); after ``Stopped``/``Failed`` it reads once more and ends.

    Args:
        job_id: job name or ARN.
        run_id: run id of the events (default ``bedrock:<job id as given>``).
        bedrock, s3: boto3 clients (built with :func:`producers.managed.aws_client` when omitted).
    """

    service = "bedrock"
    source = "bedrock"

    def __init__(self, job_id: str, *, run_id: str | None = None, bedrock: Any = None, s3: Any = None,
                 region: str | None = None, final_wait: float = 120.0, suffix: str = "metrics.csv"):
        self.job_id = job_id
        self.bedrock = bedrock or aws_client("bedrock", region=region)
        self.s3 = s3 or aws_client("s3", region=region)
        self.final_wait = final_wait
        self.suffix = suffix
        self.job_name = job_id  # the name from get_model_customization_job replaces an ARN on the first poll
        # bedrock:<name or ARN> — both are valid job identifiers, so JobStopper can act on the run id alone
        self.run_id = run_id or f"bedrock:{job_id}"
        self.status: str | None = None
        self.failure_message = ""
        self.files: S3MetricFiles | None = None
        self.last_step = 0
        self.rows_seen = 0
        self._ended_at: float | None = None
        self._last_ts = 0.0
        self.job: dict[str, Any] = {}

    def _ts(self) -> float:
        self._last_ts = max(time.time(), self._last_ts + 1e-6)  # strictly increasing: never a "duplicate"
        return self._last_ts

    @property
    def finished(self) -> bool:
        if self._ended_at is None:
            return False
        if self.status != "Completed" or self.rows_seen:
            return True
        return time.monotonic() - self._ended_at >= self.final_wait

    def poll(self) -> list[MetricEvent]:
        job = self.bedrock.get_model_customization_job(jobIdentifier=self.job_id)
        self.job = job
        if self.files is None:
            self.job_name = job.get("jobName", self.job_name)
            token = job.get("jobArn", "").rsplit("/", 1)[-1] or None
            self.files = S3MetricFiles(self.s3, job["outputDataConfig"]["s3Uri"], suffix=self.suffix,
                                       job_token=token)
        events = []
        for step, metrics in sorted(self.files.poll().items()):
            self.rows_seen += 1
            self.last_step = max(self.last_step, step)
            events.append(MetricEvent(run_id=self.run_id, step=step, metrics=metrics, ts=self._ts(),
                                      source=self.source, tags={"job": self.job_name}))
        status = job.get("status", "")
        if status != self.status:
            message = job.get("failureMessage", "") if status in ("Failed", "Stopped") else ""
            extra = {}
            final = (job.get("trainingMetrics") or {}).get("trainingLoss")
            if status == "Completed" and final is not None:
                extra["final_training_loss"] = float(final)
            events.append(status_event(self.run_id, self.last_step, status, source=self.source, ts=self._ts(),
                                       message=message, extra=extra))
            log.info("bedrock job %s: %s%s", self.job_name, status, f" ({message})" if message else "")
            self.status, self.failure_message = status, message
        if status in TERMINAL_STATUSES and self._ended_at is None:
            self._ended_at = time.monotonic()
        return events


# ---------------------------------------------------------------------------------------------------------
# rehearsal (mini-run)


def _read_lines(s3: Any, uri: str, limit: int | None, chunk: int = 1 << 20) -> list[bytes]:
    """Up to ``limit`` non-empty lines of an S3 object, fetched in ranged chunks (only as far as needed)."""
    bucket, key = parse_s3_uri(uri)
    size = s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
    lines: list[bytes] = []
    tail, offset = b"", 0
    while offset < size and (limit is None or len(lines) < limit):
        end = min(size, offset + chunk) - 1
        data = tail + s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{end}")["Body"].read()
        offset = end + 1
        parts = data.split(b"\n")
        tail = parts.pop() if offset < size else b""  # an unfinished line waits for the next chunk
        lines += [p for p in parts if p.strip()]
    return lines if limit is None else lines[:limit]


def count_records(s3: Any, uri: str) -> int:
    """Records (non-empty lines) in a JSONL file on S3."""
    return len(_read_lines(s3, uri, None))


def write_subset(s3: Any, uri: str, records: int) -> tuple[str, int]:
    """Copy the first ``records`` lines of a training JSONL next to it; returns (new URI, records written).

    ``s3://b/data/train.jsonl`` → ``s3://b/data/train.lossguard-mini-<n>.jsonl``. Only as many bytes as needed
    are read.
    """
    lines = _read_lines(s3, uri, records)
    if not lines:
        raise ValueError(f"{uri} has no records; check training_data_path")
    bucket, key = parse_s3_uri(uri)
    stem, dot, ext = key.rpartition(".")
    new_key = f"{stem}.lossguard-mini-{len(lines)}.{ext}" if dot else f"{key}.lossguard-mini-{len(lines)}"
    s3.put_object(Bucket=bucket, Key=new_key, Body=b"\n".join(lines) + b"\n")
    return f"s3://{bucket}/{new_key}", len(lines)


@dataclass
class Verdict:
    """The rehearsal's answer: ``go`` or not, the issues found and the changes suggested."""

    go: bool
    issues: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": "go" if self.go else "no-go", "issues": self.issues, "suggestions": self.suggestions,
                "summary": self.summary}

    def __str__(self) -> str:
        out = [f"verdict: {'GO' if self.go else 'NO-GO'}"]
        out += [f"  issue: {i}" for i in self.issues] or ["  no issues found"]
        out += [f"  suggest: {s}" for s in self.suggestions]
        return "\n".join(out)


_LR_ALERTS = {"loss_spike", "nonfinite_metric", "saturated_loss", "convergence_divergence", "gradient_explosion",
              "lr_too_high", "loss_oscillation"}


def verdict(status: str | None, events: list[MetricEvent], alerts: list[Alert],
            hyperparameters: Mapping[str, str], base_model_id: str, failure_message: str = "") -> Verdict:
    """Judge a rehearsal: the job must complete, publish metrics, raise no high/critical alert, and learn."""
    v = Verdict(go=True)
    losses = [(e.step, e.metrics["loss"]) for e in events if "loss" in e.metrics]
    v.summary = {"status": status, "steps": len(losses), "alerts": len(alerts)}
    if status != "Completed":
        v.go = False
        v.issues.append(f"the rehearsal job ended {status}" + (f": {failure_message}" if failure_message else ""))
        if failure_message:
            v.suggestions.append("fix what the failure message names (data format, permissions, quotas) "
                                 "and rehearse again")
    if status == "Completed" and not losses:
        v.go = False
        v.issues.append("no step metrics were found under the job's output prefix")
        v.suggestions.append("check the job's outputDataConfig and that the role can write there")
    serious = [a for a in alerts if a.status == "firing" and severity_rank(a.severity) >= severity_rank("high")]
    for a in serious:
        v.go = False
        v.issues.append(f"{a.severity} {a.alert_type} at step {a.step}: {a.message}")
    try:
        _, family = family_for(base_model_id)
        specs = family["hyperparameters"]
    except ValueError:
        specs = {}
    if any(a.alert_type in _LR_ALERTS for a in serious):
        for key in ("learningRate", "learningRateMultiplier"):
            if key in specs:
                current = float(hyperparameters.get(key, specs[key]["default"]))
                v.suggestions.append(f"lower {key} to \"{_fmt(max(specs[key]['min'], current / 2))}\" "
                                     "(the loss diverged or spiked)")
        if "learningRateWarmupSteps" in specs:
            current = int(float(hyperparameters.get("learningRateWarmupSteps",
                                                    specs["learningRateWarmupSteps"]["default"])))
            longer = min(specs["learningRateWarmupSteps"]["max"], max(current * 2, 10))
            if longer > current:
                v.suggestions.append(f"raise learningRateWarmupSteps to \"{longer}\"")
    if len(losses) >= 10:
        k = max(1, len(losses) // 10)
        first = sum(x for _, x in losses[:k]) / k
        last = sum(x for _, x in losses[-k:]) / k
        v.summary.update(first_loss=first, last_loss=last)
        if math.isfinite(first) and math.isfinite(last) and last >= first:
            v.go = False
            v.issues.append(f"the training loss did not decrease ({first:.4g} → {last:.4g} over "
                            f"{len(losses)} steps)")
            if not any(a.alert_type in _LR_ALERTS for a in serious):
                v.suggestions.append("check the data format and labels; if they are right, raise the learning "
                                     "rate within the family's range or train more steps")
    return v
