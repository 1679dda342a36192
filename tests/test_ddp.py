"""A 2-process Lightning DDP run on CPU (gloo) through the real broker: a NaN on rank 1 alone reaches the
report (rank 0 sends the mean loss over ranks), and a stop request that the ranks hear at different steps
stops both at the same step (the decision is reduced across ranks), so DDP does not hang. The same for
the Hugging Face Trainer, whose reported loss is the mean of the ranks' losses of the step."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning.pytorch")

from detectors.events import decode_metric_record  # noqa: E402
from tests.conftest import read_topic  # noqa: E402

pytestmark = pytest.mark.slow
JOB = Path(__file__).with_name("_ddp_job.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(job: Path, topics, tmp_path: Path, name: str, **extra: str) -> None:
    """Start both ranks of ``job`` (the torchrun variables set by hand) and wait for them to end."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = topics.env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", NODE_RANK="0",
                         LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                         PARTITIONS=str(topics.partitions), OUT_DIR=str(tmp_path), OMP_NUM_THREADS="1", **extra)
        log = open(tmp_path / f"{name}{rank}.log", "wb")
        procs.append(subprocess.Popen([sys.executable, str(job)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      cwd=job.parents[1], start_new_session=True))
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    logs = "\n".join((tmp_path / f"{name}{r}.log").read_text(errors="replace")[-2000:] for r in range(2))
    assert codes == [0, 0], logs


def test_ddp_nan_on_one_rank_is_reported_and_stop_is_reduced(topics, tmp_path):
    _run_ranks(JOB, topics, tmp_path, "rank", NAN_AT="30", STOP_AT="40", RUN_ID="ddp-run")
    final = [json.loads((tmp_path / f"rank{r}.json").read_text())["global_step"] for r in range(2)]
    assert final[0] == final[1] and 40 <= final[0] < 60, f"both ranks stop at one step soon after 40: {final}"

    records = read_topic(topics.bootstrap, topics.name("metrics"), topics.partitions, timeout=1.0)
    events = [e for r in records for e in decode_metric_record(r.value)
              if e.run_id == "ddp-run" and "loss" in e.metrics]
    assert {e.tags["rank"] for e in events} == {"0"}, "rank 0 reports"
    by_step = {e.step: e.metrics["loss"] for e in events}
    assert sorted(by_step) == list(range(1, final[0] + 1))
    assert all(math.isfinite(by_step[s]) for s in range(1, 31))
    assert math.isnan(by_step[31]), "the NaN of rank 1 alone (its step 30 → global step 31) is reported"


def test_hf_trainer_ddp_stop_is_reduced(topics, tmp_path):
    pytest.importorskip("transformers")
    _run_ranks(JOB.with_name("_hf_ddp_job.py"), topics, tmp_path, "hf", STOP_AT="20", RUN_ID="hf-ddp-run")
    final = [json.loads((tmp_path / f"hf-rank{r}.json").read_text())["global_step"] for r in range(2)]
    assert final[0] == final[1] and 20 <= final[0] < 40, f"both ranks stop at one step soon after 20: {final}"
    records = read_topic(topics.bootstrap, topics.name("metrics"), topics.partitions, timeout=1.0)
    sent = {e.step: e.metrics["loss"] for r in records for e in decode_metric_record(r.value)
            if e.run_id == "hf-ddp-run" and "loss" in e.metrics}
    assert sorted(sent) == list(range(1, final[0] + 1)), "rank 0 reports every optimizer step once"
    # the loss of the step is the mean over the ranks (what HF logs through its gather), not rank 0's
    ranks = [json.loads((tmp_path / f"hf-rank{r}.json").read_text())["losses"] for r in range(2)]
    mean = {s: (ranks[0][str(s)] + ranks[1][str(s)]) / 2 for s in sent}
    assert all(sent[s] == pytest.approx(mean[s], rel=1e-5) for s in sent), (sent, ranks)
    assert sum(abs(ranks[0][str(s)] - mean[s]) > 1e-3 for s in sent) > len(sent) // 2, "the ranks' losses differ"


def test_hf_trainer_ddp_every_rank_reporting_sends_its_own_loss(topics, tmp_path):
    pytest.importorskip("transformers")
    _run_ranks(JOB.with_name("_hf_ddp_job.py"), topics, tmp_path, "hf", STOP_AT="10", RUN_ID="hf-ddp-all",
               REPORT_ALL="1")
    final = [json.loads((tmp_path / f"hf-rank{r}.json").read_text()) for r in range(2)]
    assert final[0]["global_step"] == final[1]["global_step"] and 10 <= final[0]["global_step"] < 30, final
    records = read_topic(topics.bootstrap, topics.name("metrics"), topics.partitions, timeout=1.0)
    events = [e for r in records for e in decode_metric_record(r.value) if e.run_id == "hf-ddp-all" and "loss" in e.metrics]
    for rank in range(2):
        sent = {e.step: e.metrics["loss"] for e in events if e.tags["rank"] == str(rank)}
        assert sorted(sent) == list(range(1, final[rank]["global_step"] + 1)), rank
        own = final[rank]["losses"]
        assert all(sent[s] == pytest.approx(own[str(s)], rel=1e-5) for s in sent), (rank, sent, own)
