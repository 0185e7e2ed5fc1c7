"""Standard transformer LightningModules for planner benchmarks, cheap to build on the meta device.

Plain torch and Lightning: nothing here knows about pipelines. Both models use a fused ``qkv``
Linear and, by default, ``F.scaled_dot_product_attention`` (``attention="sdpa"``): one graph node
per attention, so a 96-layer model captures quickly. On CPU (real or fake tensors) it runs as
``aten._scaled_dot_product_flash_attention_for_cpu``, which ``torch.utils.flop_counter`` itself
does not count (``lightning_rannc.profile.analytic`` maps it). ``attention="matmul"`` writes
attention out with matmuls and softmax instead (more nodes, the full score matrix in memory).

Attention-probability dropout (``attention_dropout``) defaults to 0: with any dropout, SDPA on
CPU (hence on the fake CPU tensors the analytic cost model runs on) falls back to the math
kernel, which materialises the ``seq x seq`` scores and probabilities, so the estimated memory
and time would be those of unfused attention, unlike flash attention on a GPU. Residual and
embedding dropout (``dropout``) are BERT's and GPT's 0.1::

    with torch.device("meta"):
        model = BertLM(layers=96, hidden=8192, heads=64)      # ~77.6B parameters
        model = GPTLM(layers=96, hidden=12288, heads=96, seq_len=2048)  # ~175B parameters

    python benchmarks/models.py   # prints the parameter counts of the benchmark shapes
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["BertLM", "GPTLM", "RandomTokens", "count_parameters"]


class RandomTokens(Dataset):
    """``size`` random token sequences of ``seq_len`` (inputs and targets), made on demand."""

    def __init__(self, size: int, seq_len: int, vocab: int, keys: tuple[str, str], seed: int = 0) -> None:
        self.size, self.seq_len, self.vocab, self.keys, self.seed = size, seq_len, vocab, keys, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        row = torch.randint(0, self.vocab, (self.seq_len + 1,), generator=gen)
        return {self.keys[0]: row[:-1], self.keys[1]: row[1:]}


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, hidden: int, heads: int, attention_dropout: float, causal: bool, impl: str) -> None:
        super().__init__()
        if impl not in ("matmul", "sdpa"):
            raise ValueError(f"attention must be 'matmul' or 'sdpa', not {impl!r}")
        self.heads, self.causal, self.impl, self.p = heads, causal, impl, attention_dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.attn_dropout = nn.Dropout(attention_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        q, k, v = self.qkv(x).split(hidden, dim=-1)
        q, k, v = (t.view(batch, seq, self.heads, hidden // self.heads).transpose(1, 2) for t in (q, k, v))
        if self.impl == "sdpa":
            p = self.p if self.training else 0.0
            att = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)
        else:
            scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
            if self.causal:
                scores = scores + torch.full((seq, seq), float("-inf"), dtype=scores.dtype, device=x.device).triu(1)
            att = self.attn_dropout(scores.softmax(dim=-1)) @ v
        return self.proj(att.transpose(1, 2).reshape(batch, seq, hidden))


class EncoderLayer(nn.Module):
    """Post-norm BERT layer: self-attention (no mask) then a 4x GELU MLP."""

    def __init__(self, hidden: int, heads: int, dropout: float, attention: str, attention_dropout: float) -> None:
        super().__init__()
        self.attn = Attention(hidden, heads, attention_dropout, causal=False, impl=attention)
        self.ln1 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.ln2 = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.dropout(self.attn(x)))
        return self.ln2(x + self.dropout(self.mlp(x)))


class DecoderLayer(nn.Module):
    """Pre-norm GPT layer: causal self-attention then a 4x GELU MLP."""

    def __init__(self, hidden: int, heads: int, dropout: float, attention: str, attention_dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = Attention(hidden, heads, attention_dropout, causal=True, impl=attention)
        self.ln2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln1(x)))
        return x + self.dropout(self.mlp(self.ln2(x)))


class _TokenLM(L.LightningModule):
    """What both models share: random-token data, AdamW, and cross-entropy over every token."""

    batch_keys: tuple[str, str]

    def _loader(self) -> DataLoader:
        hp = self.hparams
        dataset = RandomTokens(hp.batch_size * hp.num_batches, hp.seq_len, hp.vocab, self.batch_keys)
        return DataLoader(dataset, batch_size=hp.batch_size, shuffle=False, drop_last=True)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = (batch[k] for k in self.batch_keys)
        logits = self(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)


class BertLM(_TokenLM):
    """BERT-style encoder with a masked-LM head (transform + decoder tied to the word embedding).

    The loss is cross-entropy over all tokens (no masking): the shapes and FLOPs are BERT's.
    Batches are ``{"input_ids": (B, seq_len) int64, "labels": (B, seq_len) int64}``.
    """

    batch_keys = ("input_ids", "labels")

    def __init__(
        self,
        layers: int = 12,
        hidden: int = 768,
        heads: int = 12,
        seq_len: int = 512,
        vocab: int = 30522,
        batch_size: int = 8,
        dropout: float = 0.1,
        lr: float = 1e-4,
        num_batches: int = 16,
        attention: str = "sdpa",
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.word_emb = nn.Embedding(vocab, hidden)
        self.pos_emb = nn.Embedding(seq_len, hidden)
        self.type_emb = nn.Embedding(2, hidden)
        self.emb_ln = nn.LayerNorm(hidden)
        self.emb_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            [EncoderLayer(hidden, heads, dropout, attention, attention_dropout) for _ in range(layers)]
        )
        self.transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden))
        self.decoder = nn.Linear(hidden, vocab)
        self.decoder.weight = self.word_emb.weight  # tied, as in BERT
        for emb in (self.word_emb, self.pos_emb, self.type_emb):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_emb(input_ids) + self.pos_emb(positions) + self.type_emb.weight[0]
        x = self.emb_dropout(self.emb_ln(x))
        for layer in self.layers:
            x = layer(x)
        return self.decoder(self.transform(x))


class GPTLM(_TokenLM):
    """GPT-style decoder (GPT-2/3 layout): learned positions, pre-norm blocks, tied output head.

    Batches are ``{"tokens": (B, seq_len) int64, "targets": (B, seq_len) int64}``.
    """

    batch_keys = ("tokens", "targets")

    def __init__(
        self,
        layers: int = 12,
        hidden: int = 768,
        heads: int = 12,
        seq_len: int = 1024,
        vocab: int = 50257,
        batch_size: int = 8,
        dropout: float = 0.1,
        lr: float = 1e-4,
        num_batches: int = 16,
        attention: str = "sdpa",
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tok_emb = nn.Embedding(vocab, hidden)
        self.pos_emb = nn.Embedding(seq_len, hidden)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            [DecoderLayer(hidden, heads, dropout, attention, attention_dropout) for _ in range(layers)]
        )
        self.ln_f = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.tok_emb.weight  # tied
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.01)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb_dropout(self.tok_emb(tokens) + self.pos_emb(torch.arange(tokens.shape[1], device=tokens.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class HFGPT2LM(_TokenLM):
    """transformers' ``GPT2LMHeadModel`` (a model nobody here wrote) in the shape asked for, with
    ``GPTLM``'s data and loss. Built from a config: nothing is downloaded. Its attention is
    transformers' default (``sdpa``); dropout is GPT-2's (0.1) but on the attention
    probabilities, which is 0 as in ``GPTLM`` (see the top of this file: with it, SDPA on the CPU
    captures unfused attention, a 2048 x 2048 score matrix per head and its dropout mask kept
    for backward, which a GPU's flash attention does not keep).

    Batches are ``{"tokens": (B, seq_len) int64, "targets": (B, seq_len) int64}``.
    """

    batch_keys = ("tokens", "targets")

    def __init__(
        self,
        layers: int = 12,
        hidden: int = 768,
        heads: int = 12,
        seq_len: int = 1024,
        vocab: int = 50257,
        batch_size: int = 8,
        dropout: float = 0.1,
        lr: float = 1e-4,
        num_batches: int = 16,
        attention: str = "sdpa",
        attention_dropout: float = 0.0,
    ) -> None:
        import transformers  # the dev extras have it; only this model needs it

        super().__init__()
        self.save_hyperparameters()
        config = transformers.GPT2Config(
            n_layer=layers, n_embd=hidden, n_head=heads, n_positions=seq_len, vocab_size=vocab,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=attention_dropout, bos_token_id=0, eos_token_id=0,
            attn_implementation="eager" if attention == "matmul" else attention,
        )  # fmt: skip
        self.model = transformers.GPT2LMHeadModel(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens).logits


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model``, tied ones counted once."""
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    shapes = {
        "BERT-base": (BertLM, {}),
        "BERT-77B": (BertLM, dict(layers=96, hidden=8192, heads=64)),
        "GPT-2 small": (GPTLM, {}),
        "GPT-175B": (GPTLM, dict(layers=96, hidden=12288, heads=96, seq_len=2048)),
    }
    for label, (cls, kwargs) in shapes.items():
        with torch.device("meta"):
            model = cls(**kwargs)
        print(
            f"{label:12s} {cls.__name__}({', '.join(f'{k}={v}' for k, v in kwargs.items())}): "
            f"{count_parameters(model) / 1e9:.2f}B parameters"
        )
