"""The GPT example through ``LightningCLI``: every Trainer, model, data and strategy setting
from YAML, the strategy as ``strategy: rannc`` or as a ``class_path`` with its arguments::

    python examples/gpt_cli.py fit --config configs/gpt_cli.yaml
    python examples/gpt_cli.py fit --config configs/gpt_cli.yaml --trainer.strategy.init_args.pipeline_stages=1
    python examples/gpt_cli.py fit --config configs/gpt_cli_short.yaml

Needs ``jsonargparse[signatures]`` (``pip install -e ".[cli]"``), as LightningCLI does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

import lightning_rannc  # noqa: F401  (registers strategy="rannc" before the YAML is read)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpt import GPT, make_dataloader  # noqa: E402


class TokenData(L.LightningDataModule):
    """Synthetic token sequences (see ``gpt.SyntheticTokens``)."""

    def __init__(self, batch_size: int = 16, seq_len: int = 32, vocab_size: int = 256, size: int = 1024) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return make_dataloader(hp.batch_size, hp.seq_len, hp.vocab_size, hp.size)


class PrintLoss(L.Callback):
    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            plan = getattr(trainer.strategy, "plan", None)
            layout = f"{plan.pipeline_stages} stage(s) x {plan.num_replicas} replica(s)" if plan else "-"
            loss = float(trainer.callback_metrics["train_loss"])
            print(f"final train_loss {loss:.4f} after {trainer.global_step} steps; layout {layout}")


def main() -> None:
    LightningCLI(GPT, TokenData, trainer_defaults={"callbacks": [PrintLoss()]}, save_config_callback=None)


if __name__ == "__main__":
    main()
