"""One rank of a 2-process Lightning DDP run on CPU (gloo), for tests/test_ddp.py: started twice with the
usual RANK / LOCAL_RANK / WORLD_SIZE / MASTER_* variables (Lightning then starts no processes itself).
Rank 1 alone computes a NaN loss from step ``NAN_AT``; rank 0 sends a stop request at ``STOP_AT``.
Writes ``{"rank", "global_step"}`` to ``$OUT_DIR/rank<N>.json``."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402

from detectors.events import ControlEvent  # noqa: E402
from producers.lightning import LossguardCallback  # noqa: E402
from stream_app.control_cli import send_control  # noqa: E402

NAN_AT, STOP_AT = int(os.environ.get("NAN_AT", "-1")), int(os.environ.get("STOP_AT", "-1"))
RUN_ID = os.environ.get("RUN_ID", "")
torch.set_num_threads(1)


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.global_rank == 1 and self.global_step >= NAN_AT:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Operator(pl.Callback):
    """Rank 0 asks to stop; the ranks then hear it at different moments (rank 1 sleeps longer)."""

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_rank == 0 and trainer.global_step == STOP_AT:
            send_control(ControlEvent(RUN_ID, "stop", "ddp test"), os.environ["LOSSGUARD_BOOTSTRAP"],
                         f"{os.environ['LOSSGUARD_TOPIC_PREFIX']}.control", int(os.environ["PARTITIONS"]))
        time.sleep(0.02 if trainer.global_rank == 0 else 0.05)


def main() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = x.sum(1, keepdim=True)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(max_steps=400, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[LossguardCallback(RUN_ID, bootstrap=os.environ["LOSSGUARD_BOOTSTRAP"]),
                                    Operator()])
    trainer.fit(Module(), loader)
    out = Path(os.environ["OUT_DIR"]) / f"rank{trainer.global_rank}.json"
    out.write_text(json.dumps({"rank": trainer.global_rank, "global_step": trainer.global_step}))


if __name__ == "__main__":
    main()
