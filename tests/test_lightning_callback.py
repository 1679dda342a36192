"""The Lightning callback on real ``Trainer.fit`` runs through the real broker: per-batch loss and
pre-clip grad norm, validation metrics, a stop request, and the checkpoint round trip of its state."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")

from detectors.events import ControlEvent, decode_metric_record  # noqa: E402
from producers.lightning import LossguardCallback  # noqa: E402
from stream_app.control_cli import send_control  # noqa: E402
from tests.conftest import read_topic  # noqa: E402

torch.set_num_threads(1)


class _MLP(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _loader(n: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g) * 10  # large inputs: gradients far above the clip value
    y = torch.randint(0, 2, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _fit(callbacks, max_steps: int, ckpt_path=None, **kwargs) -> pl.Trainer:
    torch.manual_seed(0)
    trainer = pl.Trainer(max_steps=max_steps, callbacks=callbacks, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=1e-3, limit_val_batches=1, num_sanity_val_steps=1, **kwargs)
    trainer.fit(_MLP(), _loader(), _loader(8, seed=1), ckpt_path=ckpt_path)
    return trainer


def _events(topics, run_id: str):
    records = read_topic(topics.bootstrap, topics.name("metrics"), topics.partitions, timeout=1.0)
    return [e for e in (e for r in records for e in decode_metric_record(r.value)) if e.run_id == run_id]


def test_state_dict_round_trip():
    saved = LossguardCallback("run-a", attempt=2)
    saved.last_step = 41
    restored = LossguardCallback()
    restored.load_state_dict(saved.state_dict())
    assert (restored.run_id, restored.attempt, restored.last_step) == ("run-a", 3, 41)


def test_fit_reports_steps_and_validation_and_resume_keeps_the_run(topics, tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSGUARD_TOPIC_PREFIX", topics.prefix)
    first = _fit([LossguardCallback("pl-run", bootstrap=topics.bootstrap, tags={"dataset": "random"})], 6)
    ckpt = tmp_path / "mid.ckpt"
    first.save_checkpoint(ckpt)
    resumed = LossguardCallback(bootstrap=topics.bootstrap)  # a fresh process: no run id given
    _fit([resumed], 10, ckpt_path=str(ckpt))

    assert resumed.run_id == "pl-run" and resumed.attempt == 1
    events = _events(topics, "pl-run")
    train = [e for e in events if "loss" in e.metrics]
    assert [e.step for e in train] == list(range(1, 11))
    assert [e.tags.get("attempt") for e in train] == ["0"] * 6 + ["1"] * 4
    assert train[-1].tags["resumed_at_step"] == "6" and train[0].tags["model"] == "_MLP"
    # the norm from before Lightning's clipping (clip value 1e-3)
    assert all(e.metrics["grad_norm"] > 1e-2 for e in train)
    assert all(e.metrics["batch_size"] == 8 and e.metrics["lr"] == 0.5 for e in train)
    val = [e for e in events if "val_loss" in e.metrics]
    assert [e.step for e in val] == [4, 8], "one validation per epoch of 4 batches, no sanity check"


def test_stop_request_sets_trainer_should_stop(topics, monkeypatch):
    monkeypatch.setenv("LOSSGUARD_TOPIC_PREFIX", topics.prefix)

    class Operator(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                send_control(ControlEvent("pl-stop", "stop", "diverging"), topics.bootstrap,
                             topics.name("control"), topics.partitions)

        def on_train_batch_start(self, *args):
            import time

            time.sleep(0.05)

    callback = LossguardCallback("pl-stop", bootstrap=topics.bootstrap)
    trainer = _fit([callback, Operator()], 500)
    assert trainer.global_step <= 15
    assert callback.reporter.should_stop and callback.reporter.stop_reason == "diverging"
