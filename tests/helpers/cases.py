"""Training cases run both pipelined (in a multi-process script) and as a single-process reference.

Each case records, per batch, the loss Lightning saw and the logged metrics, and writes a
checkpoint at the last step (before ``on_train_end``, so the pipelined run gathers it from the
stages). The reference is plain Lightning on one CPU process with the same seed and the same
global batches: with D replicas each reads every D-th sample of the sequence, so the reference
reads batches D times larger in plain order.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from helpers.models import (
    GPT,
    BatchNormCNN,
    ColumnMajor,
    FusedLoudHeadGPT,
    LoggingMLP,
    LoudHeadGPT,
    MetaGPT,
    ReducingMLP,
    ResCNN,
    ScheduledGPT,
    SkipMLP,
    SteppingGPT,
    StridedGPT,
    SyntheticTokens,
    VaryingLength,
    image_data,
    table_data,
)

MAX_STEPS = 6

QUIET = dict(
    accelerator="cpu",
    devices=1,
    max_steps=2,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)
"""A short single-process Trainer that prints little (the in-process tests' base)."""


class ShardedData(L.LightningDataModule):
    """In-order batches; over replicas, a non-shuffling DistributedSampler (Lightning's own shuffles)."""

    def __init__(
        self,
        train: Dataset,
        batch_size: int,
        val: Dataset | None = None,
        collate: Any = None,
        predict: Dataset | None = None,
    ) -> None:
        super().__init__()
        self.train, self.val, self.batch_size, self.collate = train, val, batch_size, collate
        self.predict = predict

    def _loader(self, dataset: Dataset) -> DataLoader:
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None)
        sampler = DistributedSampler(dataset, shuffle=False, **kwargs) if kwargs else None
        collate = self.collate() if self.collate else None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=False, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val) if self.val is not None else []

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader | list:
        return self._loader(self.predict) if self.predict is not None else []


def _gpt_tokens(size: int) -> Dataset:
    return SyntheticTokens(size, seq_len=16, vocab_size=256)


# name -> (model factory, data factory taking the batch size, extra Trainer arguments)
CASES: dict[str, tuple[Callable[[], L.LightningModule], Callable[[int], ShardedData], dict[str, Any]]] = {
    "gpt": (lambda: GPT(layers=4, dim=32, seq_len=16), lambda b: ShardedData(_gpt_tokens(64), b), {}),
    "gpt6": (lambda: GPT(layers=6, dim=32, seq_len=16), lambda b: ShardedData(_gpt_tokens(64), b), {}),
    "cnn": (ResCNN, lambda b: ShardedData(image_data(64), b), {}),
    # BatchNorm statistics are per micro-batch: the reference reads micro-batches and accumulates.
    "cnn_bn": (BatchNormCNN, lambda b: ShardedData(image_data(64), b), {}),
    # Stages in the middle pass a value on untouched and begin with a transpose (gradients
    # that alias the received ones, and views).
    "skip": (SkipMLP, lambda b: ShardedData(image_data(64), b), {}),
    # Validation every 3 steps: the module is gathered for it, then released, and training goes on.
    "logging": (LoggingMLP, lambda b: ShardedData(table_data(64), b, val=table_data(16)), {"val_check_interval": 3}),
    # A loss summed over samples; values logged with reduce_fx max, min and sum, and sync_dist.
    "reducing": (ReducingMLP, lambda b: ShardedData(table_data(64), b), {}),
    # Every training knob at once: tied embedding, LR scheduler, norm clipping, accumulation.
    "gpt_full": (
        lambda: ScheduledGPT(layers=4, dim=32, seq_len=16),
        lambda b: ShardedData(_gpt_tokens(256), b),
        {"gradient_clip_val": 0.5, "accumulate_grad_batches": 2},
    ),
    # The schedule reads trainer.estimated_stepping_batches: the data are set up during setup.
    "gpt_stepping": (
        lambda: SteppingGPT(layers=4, dim=32, seq_len=16),
        lambda b: ShardedData(_gpt_tokens(64), b),
        {"max_epochs": 2},  # with max_epochs, estimated_stepping_batches sets up the data to count them
    ),
    "gpt_dropout": (
        lambda: GPT(layers=4, dim=32, seq_len=16, dropout=0.1),
        lambda b: ShardedData(_gpt_tokens(64), b),
        {},
    ),
    "gpt_bf16_mixed": (
        lambda: GPT(layers=4, dim=32, seq_len=16),
        lambda b: ShardedData(_gpt_tokens(64), b),
        {"precision": "bf16-mixed"},
    ),
    "gpt_bf16_true": (
        lambda: GPT(layers=4, dim=32, seq_len=16),
        lambda b: ShardedData(_gpt_tokens(64), b),
        {"precision": "bf16-true"},
    ),
    # Loss scaling where the first step overflows in the last stage's weights only.
    "gpt_fp16": (
        lambda: LoudHeadGPT(layers=4, dim=32, seq_len=16),
        lambda b: ShardedData(_gpt_tokens(64), b),
        {"plugins": lambda: [_overflowing_fp16()]},
    ),
    "gpt_fp16_fused": (
        lambda: FusedLoudHeadGPT(layers=4, dim=32, seq_len=16),
        lambda b: ShardedData(_gpt_tokens(64), b),
        {"plugins": lambda: [_overflowing_fp16()]},
    ),
    # Created on the meta device: each rank allocates and initialises only its stages' tensors.
    "gpt_meta": (
        lambda: MetaGPT(layers=4, dim=32, seq_len=16),
        lambda b: ShardedData(_gpt_tokens(64), b),
        {"meta_init": True},
    ),
    # Non-contiguous batch leaves and metric arguments (torch < 2.13 checks strides).
    "gpt_strided": (
        lambda: StridedGPT(layers=4, dim=32, seq_len=16),
        lambda b: ShardedData(_gpt_tokens(64), b, collate=ColumnMajor),
        {},
    ),
    # Sequence length changes from batch to batch, and the last batch is smaller (36 = 4 x 8 + 4).
    "gpt_varlen": (
        lambda: GPT(layers=2, dim=32, seq_len=16),
        lambda b: ShardedData(_gpt_tokens(36 * b // 8), b, collate=VaryingLength),
        {"max_epochs": 2},
    ),
}


def _overflowing_fp16() -> Any:
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, backoff_factor=2.0**-10, growth_interval=1000)
    return MixedPrecision("16-mixed", "cpu", scaler=scaler)


class Recorder(L.Callback):
    """Per-batch loss and logged metrics; a checkpoint and memory facts at the last step."""

    def __init__(self, checkpoint: Path | None) -> None:
        self.checkpoint = checkpoint
        self.losses: list[float] = []
        self.metrics: list[dict[str, float]] = []
        self.kept_params: list[str] = []
        self.optimizer_state_numel = 0
        self.grad_numel = 0
        self.optimizer_holds_module_params = True
        self.local_buffers: dict[str, Any] = {}
        self.loss_scales: list[float] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.loss_scales.append(float(scaler.get_scale()))
        self.metrics.append({k: float(v) for k, v in sorted(trainer.callback_metrics.items())})
        if trainer.global_step == trainer.max_steps and not self.kept_params:
            self._last_step(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        # The gradients this rank holds at the step (ZeRO-2: its share only).
        self.grad_numel = sum(p.grad.numel() for p in pl_module.parameters() if p.grad is not None)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.max_steps == -1:  # epoch-bounded runs: record at the end instead
            self._last_step(trainer, pl_module)

    def _last_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Parameters this rank still holds (others' are meta tensors while training).
        self.kept_params = [n for n, p in pl_module.named_parameters() if not p.is_meta]
        self.local_buffers = {n: b.tolist() for n, b in pl_module.named_buffers() if not b.is_meta}
        held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.optimizer_holds_module_params = held <= {id(p) for p in pl_module.parameters()}  # not host copies
        state = trainer.optimizers[0].state.values()
        self.optimizer_state_numel = sum(t.numel() for s in state for t in s.values() if torch.is_tensor(t) and t.dim())
        if self.checkpoint is not None:
            trainer.save_checkpoint(self.checkpoint)


def run_case(
    name: str,
    out_dir: Path,
    label: str | None = None,
    batch_scale: int = 1,
    batch_size: int | None = None,
    ckpt_path: str | Path | None = None,
    **trainer_kwargs: Any,
) -> L.Trainer:
    """Train case ``name`` (resuming from ``ckpt_path`` if given); write ``<label>_rank<r>.json``
    and ``<label>.ckpt`` under ``out_dir``."""
    label = label or name
    make_model, make_data, case_kwargs = CASES[name]
    recorder = Recorder(out_dir / f"{label}.ckpt")
    options: dict[str, Any] = dict(
        accelerator="cpu",
        max_steps=MAX_STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[recorder],
    )
    meta_init = case_kwargs.get("meta_init", False)
    options.update({k: v() if callable(v) else v for k, v in case_kwargs.items() if k != "meta_init"})
    if "max_epochs" in case_kwargs:
        options["max_steps"] = -1
    options.update(trainer_kwargs)
    trainer = L.Trainer(**options)
    L.seed_everything(0, verbose=False)
    if meta_init:
        with trainer.init_module(empty_init=True):
            model = make_model()
    else:
        model = make_model()
    trainer.fit(model, datamodule=make_data(batch_size or 8 * batch_scale), ckpt_path=ckpt_path)
    plan = getattr(trainer.strategy, "plan", None)
    record = {
        "plan": plan.to_json() if plan is not None else None,
        "losses": recorder.losses,
        "metrics": recorder.metrics,
        "kept_params": recorder.kept_params,
        "local_buffers": recorder.local_buffers,
        "loss_scales": recorder.loss_scales,
        "optimizer_state_numel": recorder.optimizer_state_numel,
        "grad_numel": recorder.grad_numel,
        "optimizer_holds_module_params": recorder.optimizer_holds_module_params,
        "batch_shapes_built": len(_pipeline(trainer).runtimes) if _pipeline(trainer) is not None else 0,
        "schedule_class": _schedule_class(trainer),
        "ddp_stages": _ddp_stages(trainer),
        # a module built on the meta device stays partitioned after fit: only this rank's tensors
        "final_state": {k: v.tolist() for k, v in model.state_dict().items() if not v.is_meta},
    }
    (out_dir / f"{label}_rank{trainer.global_rank}.json").write_text(json.dumps(record))
    return trainer


def _pipeline(trainer: L.Trainer) -> Any:
    """The strategy's built pipeline (``None`` for other strategies)."""
    return getattr(getattr(trainer.strategy, "engine", None), "pipeline", None)


def _schedule_class(trainer: L.Trainer) -> str | None:
    runtime = getattr(_pipeline(trainer), "last_runtime", None)
    return type(runtime.schedule).__name__ if runtime is not None else None


def _ddp_stages(trainer: L.Trainer) -> int:
    """Stages of this rank whose module torch's pipeline drives as DDP (replicas' gradient exchange)."""
    runtime = getattr(_pipeline(trainer), "last_runtime", None)
    stages = runtime.stages if runtime is not None else []
    return sum(isinstance(stage.submod, torch.nn.parallel.DistributedDataParallel) for stage in stages)


def load_record(out_dir: Path, label: str, rank: int) -> dict[str, Any]:
    record = json.loads((out_dir / f"{label}_rank{rank}.json").read_text())
    record["final_state"] = {k: torch.tensor(v) for k, v in record["final_state"].items()}
    return record
