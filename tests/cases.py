"""Training cases run both pipelined (in a multi-process script) and as a single-process reference.

Each case records, per step, the loss Lightning saw and the logged metrics, and writes a
checkpoint at the last step (before ``on_train_end``, so the pipelined run gathers it from the
stages). The reference is plain Lightning on one CPU process with the same seed and batches.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from models import GPT, LoggingMLP, ResCNN, image_loader, make_dataloader, table_loader

MAX_STEPS = 6

CASES: dict[str, Callable[[], tuple[L.LightningModule, Any, Any]]] = {
    "gpt": lambda: (GPT(layers=4, dim=32, seq_len=16), make_dataloader(8, 16, 256, size=64), None),
    "gpt6": lambda: (GPT(layers=6, dim=32, seq_len=16), make_dataloader(8, 16, 256, size=64), None),
    "cnn": lambda: (ResCNN(), image_loader(), None),
    # Validation every 3 steps: the module is gathered for it, then released, and training goes on.
    "logging": lambda: (LoggingMLP(), table_loader(), table_loader(size=16)),
}


class Recorder(L.Callback):
    """Per-step loss and logged metrics; a checkpoint at the last step."""

    def __init__(self, checkpoint: Path | None) -> None:
        self.checkpoint = checkpoint
        self.losses: list[float] = []
        self.metrics: list[dict[str, float]] = []
        self.kept_params: list[str] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))
        self.metrics.append({k: float(v) for k, v in sorted(trainer.callback_metrics.items())})
        if trainer.global_step == trainer.max_steps:
            # Parameters this rank still holds (others' are meta tensors while training).
            self.kept_params = [n for n, p in pl_module.named_parameters() if not p.is_meta]
            if self.checkpoint is not None:
                trainer.save_checkpoint(self.checkpoint)


def run_case(name: str, out_dir: Path, **trainer_kwargs: Any) -> L.Trainer:
    """Train case ``name``; write ``<name>_rank<r>.json`` and ``<name>.ckpt`` under ``out_dir``."""
    L.seed_everything(0, verbose=False)
    model, loader, val_loader = CASES[name]()
    recorder = Recorder(out_dir / f"{name}.ckpt")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=MAX_STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
        val_check_interval=3,
        **trainer_kwargs,
    )
    trainer.fit(model, loader, val_loader)
    plan = getattr(trainer.strategy, "plan", None)
    record = {
        "plan": plan.to_json() if plan is not None else None,
        "losses": recorder.losses,
        "metrics": recorder.metrics,
        "kept_params": recorder.kept_params,
        "final_state": {k: v.tolist() for k, v in model.state_dict().items()},
    }
    (out_dir / f"{name}_rank{trainer.global_rank}.json").write_text(json.dumps(record))
    return trainer


def load_record(out_dir: Path, name: str, rank: int) -> dict[str, Any]:
    record = json.loads((out_dir / f"{name}_rank{rank}.json").read_text())
    record["final_state"] = {k: torch.tensor(v) for k, v in record["final_state"].items()}
    return record
