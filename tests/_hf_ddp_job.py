"""One rank of a 2-process Hugging Face Trainer run on CPU (gloo), for tests/test_ddp.py: rank 0 sends a
stop request at ``STOP_AT``; the ranks hear it at different moments. Writes the final global step and the
rank's own loss of every optimizer step (what ``training_step`` returned) to ``$OUT_DIR/hf-rank<N>.json``.
``REPORT_ALL=1``: every rank reports (``report_rank=None``)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from detectors.events import ControlEvent  # noqa: E402
from producers.hf import LossguardCallback  # noqa: E402
from stream_app.control_cli import send_control  # noqa: E402

STOP_AT, RUN_ID = int(os.environ.get("STOP_AT", "-1")), os.environ.get("RUN_ID", "")
RANK = int(os.environ.get("RANK", "0"))
torch.set_num_threads(1)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 512):
        self.ids = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Operator(TrainerCallback):
    def __init__(self, trainer_losses: list):
        self.micro, self.losses = trainer_losses, {}

    def on_step_end(self, args, state, control, **kw):
        self.losses[state.global_step] = float(sum(self.micro))  # this rank's loss of the step
        self.micro.clear()
        if RANK == 0 and state.global_step == STOP_AT:
            send_control(ControlEvent(RUN_ID, "stop", "hf ddp test"), os.environ["LOSSGUARD_BOOTSTRAP"],
                         f"{os.environ['LOSSGUARD_TOPIC_PREFIX']}.control", int(os.environ["PARTITIONS"]))
        time.sleep(0.02 if RANK == 0 else 0.05)


def main() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    args = TrainingArguments(output_dir=os.environ["OUT_DIR"] + f"/hf{RANK}", max_steps=300,
                             per_device_train_batch_size=2, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, logging_steps=50, dataloader_num_workers=0)
    micro: list[float] = []
    operator = Operator(micro)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(),
                      callbacks=[LossguardCallback(RUN_ID, bootstrap=os.environ["LOSSGUARD_BOOTSTRAP"],
                                                 report_rank=None if os.environ.get("REPORT_ALL") else 0), operator])
    step_fn = trainer.training_step

    def training_step(*a, **kw):
        loss = step_fn(*a, **kw)
        micro.append(loss.item())
        return loss

    trainer.training_step = training_step
    assert args.world_size == 2, args.world_size
    trainer.train()
    out = Path(os.environ["OUT_DIR"]) / f"hf-rank{RANK}.json"
    out.write_text(json.dumps({"rank": RANK, "global_step": trainer.state.global_step, "losses": operator.losses}))


if __name__ == "__main__":
    main()
