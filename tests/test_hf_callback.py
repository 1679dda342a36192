"""The Hugging Face callback on a real ``Trainer`` run (tiny random GPT-2 from a config, no downloads)
through the real broker: the real NaN loss that ``logging_nan_inf_filter`` hides, time-based eval,
a stop request, and a resumed run keeping its id with a new attempt."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from detectors.events import ControlEvent, decode_metric_record  # noqa: E402
from producers.hf import LossguardCallback  # noqa: E402
from stream_app.control_cli import send_control  # noqa: E402
from tests.conftest import read_topic  # noqa: E402

torch.set_num_threads(1)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, length: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _gpt2(n_embd: int = 16):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=n_embd, n_layer=2, n_head=2))


def _trainer(tmp_path, callbacks, max_steps: int, model=None, train_dataset=None, eval_dataset=None, **args):
    from transformers import Trainer, TrainingArguments

    model = model if model is not None else _gpt2()
    settings = {"per_device_train_batch_size": 4, "per_device_eval_batch_size": 8, "learning_rate": 1e-3,
                "logging_steps": 1, "report_to": [], "save_strategy": "no", "use_cpu": True, "disable_tqdm": True,
                "dataloader_num_workers": 0, **args}
    targs = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=max_steps, **settings)
    return Trainer(model=model, args=targs, train_dataset=train_dataset or _Tokens(),
                   eval_dataset=eval_dataset or _Tokens(16, seed=1), callbacks=callbacks)


def _events(topics, run_id: str):
    records = read_topic(topics.bootstrap, topics.name("metrics"), topics.partitions, timeout=1.0)
    return [e for e in (e for r in records for e in decode_metric_record(r.value)) if e.run_id == run_id]


class _Script(transformers.TrainerCallback):
    """Plays the failure and the operator: poisons the embeddings at one step, asks to stop at another."""

    def __init__(self, poison_at: int, stop_at: int, topics, run_id: str):
        self.poison_at, self.stop_at, self.topics, self.run_id = poison_at, stop_at, topics, run_id
        self.hf_logs: dict[int, dict] = {}

    def on_step_begin(self, args, state, control, model=None, **kw):
        if state.global_step == self.poison_at:
            with torch.no_grad():
                model.transformer.wte.weight[3] = float("inf")  # every later loss is NaN
        if state.global_step == self.stop_at:
            send_control(ControlEvent(self.run_id, "stop", "test operator"), self.topics.bootstrap,
                         self.topics.name("control"), self.topics.partitions)

    def on_log(self, args, state, control, logs=None, **kw):
        self.hf_logs.setdefault(state.global_step, {}).update(logs or {})


def test_trainer_reports_the_real_nan_loss_evaluates_by_time_and_stops_on_request(topics, tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSGUARD_TOPIC_PREFIX", topics.prefix)
    run_id = "hf-nan"
    script = _Script(poison_at=6, stop_at=10, topics=topics, run_id=run_id)
    callback = LossguardCallback(run_id, bootstrap=topics.bootstrap, tags={"dataset": "random-tokens"},
                                 eval_every_seconds=0.3)
    slow = _Sleep(0.05)  # steps of ~50 ms so that wall-clock eval triggers a few times
    trainer = _trainer(tmp_path, [callback, script, slow], max_steps=200)
    result = trainer.train()

    assert result.global_step <= 20, "the stop request (sent at step 10) must end training within a few steps"
    events = _events(topics, run_id)
    steps = {e.step: e for e in events if "loss" in e.metrics and e.source == "hf"}
    assert set(range(1, 6)) <= set(steps)
    assert all(math.isfinite(steps[s].metrics["loss"]) for s in range(1, 6))
    nan_steps = [s for s, e in steps.items() if math.isnan(e.metrics["loss"])]
    assert nan_steps and min(nan_steps) == 7
    # HF's own log of that step shows a finite loss: logging_nan_inf_filter hid it
    assert math.isfinite(script.hf_logs[7]["loss"])
    first = steps[1]
    assert {"lr", "rss"} <= set(first.metrics) and "step_time" in steps[2].metrics
    assert first.tags["model"] == "gpt2" and first.tags["dataset"] == "random-tokens"
    # HF clips by default: its pre-clip grad_norm arrives through on_log, once per step
    grad_steps = [e.step for e in events if "grad_norm" in e.metrics]
    assert len(grad_steps) == len(set(grad_steps)) and 1 in grad_steps
    assert any("val_loss" in e.metrics for e in events), "eval_every_seconds must have triggered an evaluation"
    assert callback.reporter.stop_reason == "test operator"


def test_attached_callback_reports_pre_clip_norm_each_step_and_resume_keeps_the_run(topics, tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSGUARD_TOPIC_PREFIX", topics.prefix)
    run_id = "hf-resume"
    first = _trainer(tmp_path, [], max_steps=4, save_strategy="steps", save_steps=4, logging_steps=50,
                     max_grad_norm=1e-3)
    LossguardCallback(run_id, bootstrap=topics.bootstrap).attach(first)
    first.train()
    # a new process would build everything again; the run id comes back from the checkpoint
    second = _trainer(tmp_path, [], max_steps=6, save_strategy="no", logging_steps=50, max_grad_norm=1e-3)
    resumed = LossguardCallback(bootstrap=topics.bootstrap).attach(second)
    second.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))

    assert resumed.run_id == run_id
    events = [e for e in _events(topics, run_id) if "loss" in e.metrics]
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e.tags.get("attempt") for e in events] == ["0"] * 4 + ["1", "1"]
    # attached: the pre-clip norm at every step, far above the 1e-3 clip threshold
    assert all(e.metrics["grad_norm"] > 1e-2 for e in events)


class _Sleep(transformers.TrainerCallback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, *a, **kw):
        import time

        time.sleep(self.seconds)


class _Part(torch.utils.data.Dataset):
    def __init__(self, data, n: int):
        self.data, self.n = data, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return self.data[i]


def test_each_eval_dataset_of_a_dict_is_watched_on_its_own(topics, tmp_path, monkeypatch):
    """``eval_dataset={"seen": ..., "unseen": ...}``: HF evaluates each set in turn and logs
    ``eval_<set>_loss``. A tiny GPT-2 memorizes 32 random sequences: the seen set's loss falls with training,
    the unseen set's climbs from its first evaluation (3.9 → 5.0). The callback sends both, and the
    detectors page the unseen set's overfitting under its own name and leave the seen set alone."""
    from detectors import DetectorSuite

    monkeypatch.setenv("LOSSGUARD_TOPIC_PREFIX", topics.prefix)
    run_id = "hf-eval-sets"
    train = _Tokens(32)
    trainer = _trainer(tmp_path, [LossguardCallback(run_id, bootstrap=topics.bootstrap)], max_steps=200,
                       model=_gpt2(n_embd=32), train_dataset=train,
                       eval_dataset={"seen": _Part(train, 16), "unseen": _Tokens(16, seed=1)},
                       per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=10,
                       eval_strategy="steps", eval_steps=20, per_device_eval_batch_size=16)
    trainer.train()

    events = sorted(_events(topics, run_id), key=lambda e: e.step)
    named = {name for e in events for name in e.metrics if name.startswith("eval_") and name.endswith("_loss")}
    assert named == {"eval_seen_loss", "eval_unseen_loss"}
    suite = DetectorSuite()
    alerts = [a for e in events for a in suite.update(e) if a.status == "firing"]
    overfit = [a for a in alerts if a.alert_type == "val_train_divergence"]
    assert overfit and all(a.message.startswith("eval_unseen_loss ") for a in overfit)
    assert any(a.severity in ("high", "critical") for a in overfit)
