"""Train on 2 processes while rank 1 fails on purpose: ``python faulty_run.py MODE``.

MODE ``raise_step``: a callback raises on rank 1 before its 4th batch (rank 0 is then waiting
in the pipeline); ``raise_setup``: rank 1 raises in ``setup`` (rank 0 is then in the strategy's
setup collectives); ``kill``: rank 1 is SIGKILLed before its 4th batch; ``too_big``: a memory
limit nothing fits, an error rank 0 finds and every rank raises; ``stuck``: rank 1 stops
before its 4th batch but stays alive (its watchdog heartbeats), so rank 0 waits in the
pipeline's collectives until its stall limit (5 s).
"""

import os
import signal
import sys
import time

import lightning as L

from lightning_rannc import RaNNCStrategy

from helpers.models import LoggingMLP, table_loader


class Fault(L.Callback):
    def __init__(self, mode: str) -> None:
        self.mode = mode

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if self.mode == "raise_setup" and trainer.global_rank == 1:
            raise ValueError("injected failure in setup on rank 1")

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: object, idx: int) -> None:
        if trainer.global_rank != 1 or idx != 3:
            return
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.mode == "raise_step":
            raise ValueError("injected failure on rank 1")
        if self.mode == "stuck":
            time.sleep(600)


def main() -> None:
    mode = sys.argv[1]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=RaNNCStrategy(
            pipeline_stages=2,
            micro_batches=2,
            fault_timeout=15,
            timeout=600,
            memory_limit=1000 if mode == "too_big" else None,
            stall_timeout=5 if mode == "stuck" else None,
        ),
        max_steps=40,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Fault(mode)],
    )
    trainer.fit(LoggingMLP(), table_loader(size=512))
    print("finished")


if __name__ == "__main__":
    main()
