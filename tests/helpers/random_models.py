"""Random small DAG models for the randomised equivalence test (``tests/distributed/test_random_models.py``).

A spec (plain JSON, so a script can rebuild the model) lists layers; each reads an earlier
output (skip connections), may reuse another layer's weights (shared parameters across
stages), may add a second branch, and may multiply by an integer mask from the batch (an
integer tensor that has to cross stages); the head adds the first hidden state back (a skip
over the whole model). Batches are (features, integer mask, labels).
"""

from __future__ import annotations

import json
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

FEATURES = 6


class RandomDAG(L.LightningModule):
    def __init__(self, spec: str) -> None:
        super().__init__()
        self.spec = json.loads(spec)
        width = self.spec["width"]
        self.inp = nn.Linear(FEATURES, width)
        owners = [str(j) for j, layer in enumerate(self.spec["layers"]) if layer["shared"] is None]
        self.layers = nn.ModuleDict({j: nn.Linear(width, width) for j in owners})
        self.head = nn.Linear(width, self.spec["classes"])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, mask, y = batch
        outs = [torch.tanh(self.inp(x))]
        for j, layer in enumerate(self.spec["layers"]):
            linear = self.layers[str(j if layer["shared"] is None else layer["shared"])]
            h = torch.tanh(linear(outs[layer["source"]]))
            if layer["branch"]:
                h = h + torch.sigmoid(linear(outs[-1])) * 0.5
            if layer["masked"]:
                h = h * mask.to(h.dtype)
            outs.append(h)
        return F.cross_entropy(self.head(outs[-1] + outs[0]), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2)


def random_loader(spec: str, batch_size: int = 8, size: int = 48) -> DataLoader:
    classes, width = json.loads(spec)["classes"], json.loads(spec)["width"]
    gen = torch.Generator().manual_seed(len(spec))
    x = torch.randn(size, FEATURES, generator=gen)
    mask = torch.randint(0, 2, (size, width), generator=gen)
    y = torch.randint(0, classes, (size,), generator=gen)
    return DataLoader(TensorDataset(x, mask, y), batch_size=batch_size)


def train(spec: str, steps: int, **trainer_kwargs: Any) -> tuple[L.Trainer, list[float], dict[str, list]]:
    """Train a fresh model of ``spec`` (seeded); return the trainer, per-step losses, final weights."""
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, out: Any, *args: Any) -> None:
            losses.append(float(out["loss"] if isinstance(out, dict) else out))

    L.seed_everything(0, verbose=False)
    model = RandomDAG(spec)
    options: dict[str, Any] = dict(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
    )  # fmt: skip
    trainer = L.Trainer(**{**options, **trainer_kwargs})
    trainer.fit(model, random_loader(spec))
    return trainer, losses, {k: v.tolist() for k, v in model.state_dict().items()}
