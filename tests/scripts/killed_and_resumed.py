"""``python killed_and_resumed.py OUT_DIR MODE`` on 2 processes (2 stages), 4 steps per epoch,
a ``last.ckpt`` every 4 steps. MODE ``straight``: 8 steps. ``killed``: rank 1 is SIGKILLed
before step 6 (after the step-4 checkpoint). ``resumed``: continues from ``last.ckpt`` to step 8.
Rank 0 writes ``MODE.json`` with the losses and final weights."""

import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_rannc import RaNNCStrategy

from helpers.models import LoggingMLP, table_loader


class Record(L.Callback):
    def __init__(self, mode: str) -> None:
        self.mode, self.losses = mode, []

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: object, idx: int) -> None:
        if self.mode == "killed" and trainer.global_rank == 1 and trainer.global_step == 5:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, out: dict, *args: object) -> None:
        self.losses.append(float(out["loss"]))


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    record = Record(mode)
    checkpoints = ModelCheckpoint(dirpath=out / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=4)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, max_steps=8, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[record, checkpoints],
        strategy=RaNNCStrategy(pipeline_stages=2, micro_batches=2, fault_timeout=15, timeout=120),
    )  # fmt: skip
    L.seed_everything(0, verbose=False)
    model = LoggingMLP()
    trainer.fit(model, table_loader(size=32), ckpt_path=out / "ckpt" / "last.ckpt" if mode == "resumed" else None)
    if trainer.is_global_zero:
        weights = {k: v.tolist() for k, v in model.state_dict().items()}
        (out / f"{mode}.json").write_text(json.dumps({"losses": record.losses, "weights": weights}))


if __name__ == "__main__":
    main()
