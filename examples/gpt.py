"""A GPT-style language model trained with ``Trainer(strategy="rannc")``.

An ordinary LightningModule: token embedding tied to the output head, a stack of pre-norm
transformer blocks, synthetic token sequences generated on the fly. Nothing in it knows about
pipelines. Settings come from ``configs/gpt_cpu.yaml`` (CPU, 2 processes); override them on
the command line::

    python examples/gpt.py
    python examples/gpt.py trainer.devices=3 model.layers=6 trainer.max_steps=50
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_rannc  # noqa: F401  (registers strategy="rannc")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CONFIGS, read_config, train  # noqa: E402


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.heads = heads
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(dim, dim=-1)
        q, k, v = (t.view(batch, seq, self.heads, dim // self.heads).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.dropout(self.proj(att.transpose(1, 2).reshape(batch, seq, dim)))
        return x + self.dropout(self.mlp(self.ln2(x)))


class GPT(L.LightningModule):
    def __init__(
        self,
        vocab_size: int = 256,
        dim: int = 64,
        layers: int = 4,
        heads: int = 4,
        seq_len: int = 32,
        dropout: float = 0.0,
        lr: float = 3e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, seq_len, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, dropout) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied: lives on the first and last stage
        nn.init.normal_(self.tok_emb.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(tokens) + self.pos_emb[:, : tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["tokens"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)


class SyntheticTokens(Dataset):
    """Sequences of an affine recurrence ``x[t+1] = (a * x[t] + b) mod vocab``: learnable, free."""

    def __init__(self, size: int, seq_len: int, vocab_size: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, vocab_size, (size, 1), generator=gen)
        steps = torch.arange(seq_len + 1)
        self.data = (starts * 5 + steps * 3 + (starts * steps) % 7) % vocab_size

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.data[index]
        return {"tokens": row[:-1], "targets": row[1:]}


def make_dataloader(batch_size: int, seq_len: int, vocab_size: int, size: int = 512) -> DataLoader:
    dataset = SyntheticTokens(size, seq_len, vocab_size)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=True)


def _loader(model: GPT, batch_size: int, size: int) -> DataLoader:
    return make_dataloader(batch_size, model.hparams.seq_len, model.hparams.vocab_size, size)


def main() -> None:
    train(read_config(__doc__, CONFIGS / "gpt_cpu.yaml"), GPT, _loader)


if __name__ == "__main__":
    main()
