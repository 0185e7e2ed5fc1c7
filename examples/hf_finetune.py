"""Fine-tune a transformers causal LM from a local ``save_pretrained`` directory with
``Trainer(strategy="rannc")``, no rank ever holding the whole model.

The LightningModule builds the model in ``configure_model``, which the strategy runs on the meta
device (``AutoModelForCausalLM.from_config``: no memory), and ``lightning_rannc.load_pretrained``
notes where its weights are: at the first batch each rank allocates only its pipeline stage and
reads only that stage's tensors from the safetensors files. The sanity check and validation run
through the pipeline. The run trains half of ``trainer.max_steps`` with a checkpoint, then a fresh
Trainer and module resume from it. Nothing is downloaded: the "pretrained" directory is made
here (a small GPT-2, from a config) when it does not exist. Settings: ``configs/hf_finetune.yaml``::

    python examples/hf_finetune.py
    python examples/hf_finetune.py model.pretrained=/path/to/a/save_pretrained/dir trainer.devices=4
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import lightning_rannc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CONFIGS, read_config  # noqa: E402


class CausalLMFinetune(L.LightningModule):
    """Any transformers causal LM, trained on its inputs shifted by one (transformers' ``labels``)."""

    def __init__(self, pretrained: str, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: Any = None

    def configure_model(self) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        if self.model is not None:  # Lightning calls the hook again for each validate/test
            return
        config = AutoConfig.from_pretrained(self.hparams.pretrained)
        self.model = AutoModelForCausalLM.from_config(config)  # on the meta device: no memory
        lightning_rannc.load_pretrained(self.model, self.hparams.pretrained)  # each rank reads its stage

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self.model(input_ids=batch, labels=batch).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def make_pretrained(directory: Path, vocab_size: int, layers: int, dim: int, heads: int, seq_len: int) -> None:
    """A small GPT-2 saved as transformers would publish it (safetensors, sharded with an index)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_layer=layers, n_embd=dim, n_head=heads, n_positions=seq_len)
    GPT2LMHeadModel(config).save_pretrained(directory, max_shard_size="200KB")


def counting_sequences(size: int, seq_len: int, vocab_size: int, batch_size: int) -> DataLoader:
    """Sequences that count up from a random start (mod the vocabulary): easy to learn."""
    generator = torch.Generator().manual_seed(1)
    starts = torch.randint(0, vocab_size, (size, 1), generator=generator)
    tokens = (starts + torch.arange(seq_len)) % vocab_size
    return DataLoader(tokens, batch_size=batch_size, shuffle=False, drop_last=True)


def _trainer(config: Any, max_steps: int, checkpoint_dir: Path) -> L.Trainer:
    return L.Trainer(
        strategy=lightning_rannc.RaNNCStrategy(**config.strategy),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=checkpoint_dir, save_last=True)],
        max_steps=max_steps,
        **{k: v for k, v in config.trainer.items() if k != "max_steps"},
    )


def main() -> None:
    config = read_config(__doc__, CONFIGS / "hf_finetune.yaml")
    pretrained = Path(config.model.pretrained)
    if not pretrained.exists():
        make_pretrained(pretrained, **config.make_pretrained)
    data = config.data
    train = counting_sequences(data.size, data.seq_len, config.make_pretrained.vocab_size, data.batch_size)
    val = counting_sequences(data.batch_size * 2, data.seq_len, config.make_pretrained.vocab_size, data.batch_size)
    checkpoints = Path(config.checkpoint_dir)
    L.seed_everything(0)
    half = config.trainer.max_steps // 2
    trainer = _trainer(config, half, checkpoints)
    trainer.fit(CausalLMFinetune(str(pretrained), config.model.lr), train, val)
    first = float(trainer.callback_metrics["train_loss"])
    # A fresh Trainer and module, as after a crash: resumed from the last checkpoint.
    trainer = _trainer(config, config.trainer.max_steps, checkpoints)
    trainer.fit(CausalLMFinetune(str(pretrained), config.model.lr), train, val, ckpt_path=checkpoints / "last.ckpt")
    if trainer.is_global_zero:
        print(f"train_loss {first:.4f} after {half} steps; checkpoint {checkpoints / 'last.ckpt'}")
        print(
            f"resumed: train_loss {float(trainer.callback_metrics['train_loss']):.4f}, "
            f"val_loss {float(trainer.callback_metrics['val_loss']):.4f} after {trainer.global_step} steps"
        )
        print(trainer.strategy.plan.summary()[0])


if __name__ == "__main__":
    main()
