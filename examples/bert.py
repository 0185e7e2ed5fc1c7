"""A BERT-style masked language model trained with ``Trainer(strategy="rannc")``.

An ordinary LightningModule: token and position embeddings, a stack of post-norm encoder
layers (bidirectional attention), a masked-LM head tied to the token embedding. The data are
synthetic sequences in which a fixed number of positions per sequence is masked, so every
micro-batch averages its loss over as many tokens as the whole batch does::

    python examples/bert.py
    python examples/bert.py trainer.devices=4 strategy.pipeline_stages=2 model.layers=8
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


class MaskedLM(L.LightningModule):
    def __init__(
        self, vocab_size: int = 512, dim: int = 64, layers: int = 4, heads: int = 4, seq_len: int = 64, lr: float = 1e-3
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, seq_len, dim))
        self.emb_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            [nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True) for _ in range(layers)]
        )
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))
        self.decoder = nn.Linear(dim, vocab_size)
        self.decoder.weight = self.tok_emb.weight  # tied: lives on the first and last stage
        nn.init.normal_(self.tok_emb.weight, std=0.02)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = self.emb_norm(self.tok_emb(batch["tokens"]) + self.pos_emb)
        for layer in self.layers:
            x = layer(x)
        logits = self.decoder(self.transform(x))
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)


class MaskedTokens(Dataset):
    """Sequences of an affine recurrence with ``masked`` positions per sequence replaced by the
    mask token (id 0); labels hold the original token there and -100 elsewhere."""

    def __init__(self, size: int, seq_len: int, vocab_size: int, masked: int = 8, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(1, vocab_size, (size, 1), generator=gen)
        steps = torch.arange(seq_len)
        self.tokens = 1 + (starts * 7 + steps * 5 + (starts * steps) % 11) % (vocab_size - 1)
        self.positions = torch.stack([torch.randperm(seq_len, generator=gen)[:masked] for _ in range(size)])

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens, labels = self.tokens[index].clone(), torch.full_like(self.tokens[index], -100)
        where = self.positions[index]
        labels[where], tokens[where] = tokens[where], 0
        return {"tokens": tokens, "labels": labels}


def _loader(model: MaskedLM, batch_size: int, size: int) -> DataLoader:
    data = MaskedTokens(size, model.hparams.seq_len, model.hparams.vocab_size)
    return DataLoader(data, batch_size=batch_size, shuffle=False, drop_last=True)


def main() -> None:
    train(read_config(__doc__, CONFIGS / "bert_cpu.yaml"), MaskedLM, _loader)


if __name__ == "__main__":
    main()
