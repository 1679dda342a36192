"""The framework integrations report what happened in training, through the real broker and worker.

A healthy Hugging Face run with the one-line callback (HF's default clipping at 1.0, gradient
accumulation 2, evaluation every 10 steps) and a healthy Lightning run with ``accumulate_grad_batches=4``
(validation each epoch): one event per optimizer step, the loss training actually computed (not
Lightning's loss divided by 4, not HF's NaN-filtered log), HF's own pre-clip grad norm at every step,
evaluation merged into the event of its step, zero "resumed" in the worker's run summary, and no alert
of medium or worse.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pl = pytest.importorskip("lightning.pytorch")

from detectors.events import decode_metric_record  # noqa: E402
from producers.hf import LossguardCallback as HFCallback  # noqa: E402
from producers.lightning import LossguardCallback as PLCallback  # noqa: E402
from tests.conftest import collect_alerts, read_topic  # noqa: E402
from tests.stream_fixtures import wait_runs  # noqa: E402
from tests.test_hf_callback import _trainer  # noqa: E402

pytestmark = pytest.mark.slow
torch.set_num_threads(1)


class _HFLogs(transformers.TrainerCallback):
    """HF's own logs per step: its loss and pre-clip grad_norm are what the events must match."""

    def __init__(self):
        self.logs: dict[int, dict] = {}

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.setdefault(state.global_step, {}).update(logs or {})


class _Regression(pl.LightningModule):
    """A learnable linear problem; remembers every loss ``training_step`` returned."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(8, 1)
        self.returned: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.returned.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _regression_loader(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.linspace(-1, 1, 8).unsqueeze(1) + 0.1 * torch.randn(n, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _events(topics, run_id: str):
    """The run's step events (without the reporter's closing event, of which there must be one)."""
    records = read_topic(topics.bootstrap, topics.name("metrics"), topics.partitions, timeout=1.0)
    events = [e for e in (e for r in records for e in decode_metric_record(r.value)) if e.run_id == run_id]
    closing = [e for e in events if e.tags.get("status") == "finished"]
    assert len(closing) == 1 and "loss" not in closing[0].metrics
    return [e for e in events if e not in closing]


def test_hf_one_liner_and_lightning_accumulation_report_the_truth(topics, start_worker, tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSGUARD_TOPIC_PREFIX", topics.prefix)
    worker = start_worker()

    # -- Hugging Face: the README's one-liner, HF's defaults for clipping ----------------------------------
    hf_steps = 40
    hf_logs = _HFLogs()
    trainer = _trainer(tmp_path, [HFCallback("truth-hf", bootstrap=topics.bootstrap), hf_logs], hf_steps,
                       gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=10)
    assert trainer.args.max_grad_norm == 1.0
    trainer.train()
    hf = _events(topics, "truth-hf")
    assert sorted(e.step for e in hf) == list(range(1, hf_steps + 1)), "one event per optimizer step"
    for e in hf:
        logged = hf_logs.logs[e.step]
        assert e.metrics["loss"] == pytest.approx(logged["loss"], rel=1e-5)
        assert e.metrics["grad_norm"] == pytest.approx(logged["grad_norm"], rel=1e-5)  # HF's pre-clip norm
        assert "epoch" not in e.metrics
    val_steps = [e.step for e in hf if "val_loss" in e.metrics]
    assert val_steps == [10, 20, 30, 40]
    assert all(e.metrics["val_loss"] == pytest.approx(hf_logs.logs[e.step]["eval_loss"])
               for e in hf if "val_loss" in e.metrics)

    # -- Lightning: accumulate_grad_batches=4, validation every epoch ------------------------------------
    pl_steps = 20
    module = _Regression()
    torch.manual_seed(0)
    pl.Trainer(max_steps=pl_steps, accumulate_grad_batches=4, accelerator="cpu", logger=False,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               num_sanity_val_steps=1, callbacks=[PLCallback("truth-pl", bootstrap=topics.bootstrap)]
               ).fit(module, _regression_loader(64, 0), _regression_loader(16, 1))
    lightning = _events(topics, "truth-pl")
    assert sorted(e.step for e in lightning) == list(range(1, pl_steps + 1)), "one event per optimizer step"
    assert len(module.returned) == 4 * pl_steps
    for e in lightning:
        returned = module.returned[4 * (e.step - 1):4 * e.step]
        assert e.metrics["loss"] == pytest.approx(sum(returned) / 4, rel=1e-5), "the unnormalised step loss"
        assert e.metrics["batch_size"] == 32 and math.isfinite(e.metrics["grad_norm"])
    # 8 batches an epoch = 2 optimizer steps; validation after each epoch, merged into its last step
    assert [e.step for e in lightning if "val_loss" in e.metrics] == list(range(2, pl_steps + 1, 2))

    # -- the worker: nothing counted as resumed, nothing medium or worse ---------------------------------
    # every step and the closing event (the run's last step again, same attempt: not a resume)
    expected = {"truth-hf": (hf_steps + 1, 0, 0, 0), "truth-pl": (pl_steps + 1, 0, 0, 0)}

    def counts(runs):
        return {name: (r.events, r.resumes, r.duplicates, r.out_of_order) for name, r in runs.items()}

    runs = wait_runs(topics.bootstrap, topics.app_id, lambda r: counts(r) == expected, timeout=90)
    assert counts(runs) == expected, worker.log()[-3000:]
    alerts = collect_alerts(topics, lambda _: False, timeout=2)
    serious = [(a.run_id, a.alert_type, a.severity, a.message) for a in alerts if a.rank >= 1]
    assert serious == []
