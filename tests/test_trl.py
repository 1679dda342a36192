"""TRL's SFT and DPO trainers with the one-line HF callback, through the real broker: a tiny GPT-2 and a
word-level tokenizer built here (no downloads). One event per optimizer step with the loss the trainer
computed (DPO's loss comes from its own ``compute_loss``, not the model's output), HF's pre-clip grad
norm, and TRL's own metrics (``rewards/margins`` …) merged into their step under canonical names."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from detectors.events import decode_metric_record  # noqa: E402
from producers.hf import LossguardCallback  # noqa: E402
from tests.conftest import read_topic  # noqa: E402
from tests.test_integrations_truth import _HFLogs  # noqa: E402

pytestmark = pytest.mark.slow
torch.set_num_threads(1)

WORDS = "the a cat dog sat ran on under mat log big small red blue good bad yes no".split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def _model(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=2, n_head=2,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config)


def _sentences(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (6,), generator=g).tolist()) for _ in range(n)]


def _common(tmp_path, name: str) -> dict:
    return {"output_dir": str(tmp_path / name), "max_steps": 8, "per_device_train_batch_size": 4,
            "logging_steps": 1, "report_to": [], "save_strategy": "no", "use_cpu": True, "disable_tqdm": True,
            "dataloader_num_workers": 0, "learning_rate": 1e-3, "gradient_accumulation_steps": 2}


def _events(topics, run_id: str):
    records = read_topic(topics.bootstrap, topics.name("metrics"), topics.partitions, timeout=1.0)
    events = [e for e in (e for r in records for e in decode_metric_record(r.value)) if e.run_id == run_id]
    return [e for e in events if e.tags.get("status") != "finished"]


def _check_steps(events, logs: _HFLogs, steps: int) -> None:
    assert sorted(e.step for e in events) == list(range(1, steps + 1)), "one event per optimizer step"
    for e in events:
        logged = logs.logs[e.step]
        assert e.metrics["loss"] == pytest.approx(logged["loss"], rel=1e-4)
        assert e.metrics["grad_norm"] == pytest.approx(logged["grad_norm"], rel=1e-4)


def test_sft_trainer(topics, tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSGUARD_TOPIC_PREFIX", topics.prefix)
    tokenizer = _tokenizer()
    logs = _HFLogs()
    trainer = trl.SFTTrainer(
        model=_model(tokenizer), processing_class=tokenizer,
        args=trl.SFTConfig(**_common(tmp_path, "sft"), max_length=16),
        train_dataset=datasets.Dataset.from_dict({"text": _sentences(64, 0)}),
        callbacks=[LossguardCallback("trl-sft", bootstrap=topics.bootstrap), logs])
    trainer.train()
    events = _events(topics, "trl-sft")
    _check_steps(events, logs, 8)
    assert all(e.source == "hf" for e in events)


def test_dpo_trainer(topics, tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSGUARD_TOPIC_PREFIX", topics.prefix)
    tokenizer = _tokenizer()
    prompts = _sentences(32, 1)
    good, bad = ([" " + s for s in _sentences(32, seed)] for seed in (2, 3))  # completions start a new word
    data = datasets.Dataset.from_dict({"prompt": prompts, "chosen": good, "rejected": bad})
    logs = _HFLogs()
    trainer = trl.DPOTrainer(
        model=_model(tokenizer), ref_model=_model(tokenizer), processing_class=tokenizer,
        args=trl.DPOConfig(**_common(tmp_path, "dpo"), max_length=32),
        train_dataset=data, callbacks=[LossguardCallback("trl-dpo", bootstrap=topics.bootstrap), logs])
    trainer.train()
    events = _events(topics, "trl-dpo")
    _check_steps(events, logs, 8)
    # TRL's DPO metrics, logged every step, arrive in the step's event under canonical names
    for e in events:
        assert e.metrics["reward_margin"] == pytest.approx(logs.logs[e.step]["rewards/margins"], rel=1e-4, abs=1e-7)
    assert any(e.metrics["loss"] != pytest.approx(0.6931, abs=1e-3) for e in events), "the DPO loss moved"
