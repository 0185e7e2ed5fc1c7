"""What every example's ``main`` does: read its YAML (OmegaConf, dotted overrides on the command
line), build the strategy from the ``strategy:`` section (type-checked by ``RaNNCConfig``),
train, and print the final loss and the throughput."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

import lightning_rannc
from lightning_rannc import RaNNCConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def read_config(doc: str | None, default: Path) -> DictConfig:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(default), help="OmegaConf YAML (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.devices=3 model.layers=6")
    parser.add_argument("--accelerator", help="short for trainer.accelerator=... (cpu, gpu)")
    parser.add_argument("--devices", type=int, help="short for trainer.devices=...")
    args = parser.parse_intermixed_args()  # flags and dotted overrides in any order
    shorthands = [f"trainer.{k}={v}" for k in ("accelerator", "devices") if (v := getattr(args, k)) is not None]
    merged = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist([*args.overrides, *shorthands]))
    assert isinstance(merged, DictConfig)
    return merged


def train(
    config: DictConfig, make_model: Callable[..., L.LightningModule], make_loader: Callable[..., DataLoader]
) -> None:
    """Train ``make_model(**config.model)`` on ``make_loader(model, **config.data)``."""
    L.seed_everything(0)
    model = make_model(**config.model)
    strategy_options: Any = OmegaConf.merge(OmegaConf.structured(RaNNCConfig), config.strategy)
    trainer = L.Trainer(
        # The schema type-checks the YAML's strategy section and names a wrong key or value.
        strategy=lightning_rannc.RaNNCStrategy(**strategy_options),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **config.trainer,
    )
    loader = make_loader(model, **config.data)
    start = time.perf_counter()
    trainer.fit(model, loader)
    elapsed = time.perf_counter() - start
    if trainer.is_global_zero:
        steps, batch = trainer.global_step, config.data.batch_size
        print(f"final train_loss {float(trainer.callback_metrics['train_loss']):.4f} after {steps} steps")
        print(f"throughput {steps * batch / elapsed:.1f} samples/s (setup included: capture, profile, plan)")
