"""transformers models nobody here wrote, built from small configs (nothing is downloaded), in a
LightningModule as a user would write it, for the huge-model tests (``tests/scripts/hf_run.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
import transformers

import lightning_rannc

KINDS = ("gpt2", "bert", "t5", "llama")
VOCAB, SEQ = 128, 16


def make_config(kind: str) -> Any:
    """A tiny config of ``kind``, without dropout (one process and a pipeline draw other masks)."""
    if kind == "gpt2":
        return transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
    if kind == "bert":
        return transformers.BertConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
    if kind == "t5":
        return transformers.T5Config(
            num_layers=2, num_decoder_layers=2, d_model=32, d_kv=16, num_heads=2, d_ff=64, vocab_size=VOCAB,
            dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
        )  # fmt: skip
    if kind == "llama":
        return transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
            vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
    raise ValueError(kind)


def model_class(kind: str) -> Any:
    names = {"gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM", "t5": "T5ForConditionalGeneration"}
    return getattr(transformers, names.get(kind, "LlamaForCausalLM"))


def save_pretrained(kind: str, directory: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """A ``save_pretrained`` directory of a freshly initialised ``kind`` model (the tests' "pretrained" weights)."""
    torch.manual_seed(seed)
    model = model_class(kind)(make_config(kind))
    options = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **options)
    return directory


class HFModule(L.LightningModule):
    """A transformers model as ``self.model``, trained on its own inputs as labels.

    ``build``: ``"init"`` builds it in ``__init__`` (under ``trainer.init_module(empty_init=True)``
    on the meta device), ``"configure_model"`` in that hook, ``"from_pretrained"`` with
    transformers' own loading (the single-process reference)."""

    def __init__(self, kind: str, pretrained: str | None = None, build: str = "init") -> None:
        super().__init__()
        self.kind, self.pretrained, self.build = kind, pretrained, build
        self.model: Any = None
        if build != "configure_model":
            self._build()

    def _build(self) -> None:
        if self.build == "from_pretrained":
            self.model = model_class(self.kind).from_pretrained(self.pretrained)
            return
        self.model = model_class(self.kind)(make_config(self.kind))
        if self.pretrained is not None:
            lightning_rannc.load_pretrained(self.model, self.pretrained)

    def configure_model(self) -> None:
        if self.model is None:
            self._build()

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self(batch))

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("test_loss", self(batch))

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def data(size: int = 48, batch_size: int = 8, seed: int = 1) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (size, SEQ), generator=generator)
    return torch.utils.data.DataLoader(tokens, batch_size=batch_size)


class Recorder(L.Callback):
    """Per-step losses, and at the end the tensors this rank holds (JSON)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.losses.append(float(outputs["loss"]))

    def write(self, path: Path, trainer: L.Trainer, module: L.LightningModule, **extra: Any) -> None:
        held = {k: v.tolist() for k, v in module.state_dict().items() if not v.is_meta}
        record = {"losses": self.losses, "held": held, **extra}
        path.write_text(json.dumps(record))
