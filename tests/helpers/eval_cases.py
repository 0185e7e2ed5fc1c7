"""Evaluation cases: ``fit`` with validation every 2 steps, then ``validate``, ``test`` and
``predict`` with the same Trainer. Each rank records what Lightning gave it.

The pipelined runs go through ``scripts/evaluate.py``; the references are plain single-process
Lightning: the same ``fit`` (for the validation inside it), and ``validate``/``test``/``predict``
of a module holding the pipelined run's final weights (so that evaluation is compared on its
own, whatever training did, e.g. with dropout).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from helpers.cases import ShardedData
from helpers.models import (
    ColumnMajor,
    EvalBatchNormCNN,
    EvalGPT,
    MetricMLP,
    OutOfOrderEvalGPT,
    StridedGPT,
    SyntheticTokens,
    image_data,
    table_data,
)


def _tokens(size: int, seed: int) -> SyntheticTokens:
    return SyntheticTokens(size, seq_len=16, vocab_size=256, seed=seed)


def _gpt_data(batch_size: int) -> ShardedData:
    # 36 validation samples: batches of 8 leave a partial last batch (another shape).
    return ShardedData(_tokens(64, 0), batch_size, val=_tokens(36, 1), predict=_tokens(20, 2))


EVAL_CASES: dict[str, tuple[Callable[[], L.LightningModule], Callable[[int], ShardedData]]] = {
    "gpt": (lambda: EvalGPT(layers=4, dim=32, seq_len=16), _gpt_data),
    # eval mode must switch dropout off: predictions are deterministic
    "gpt_dropout": (lambda: EvalGPT(layers=4, dim=32, seq_len=16, dropout=0.3), _gpt_data),
    "gpt_out_of_order": (lambda: OutOfOrderEvalGPT(layers=4, dim=32, seq_len=16), _gpt_data),
    # transposed batch leaves, and predictions that are a view of the logits
    "gpt_strided": (
        lambda: StridedGPT(layers=4, dim=32, seq_len=16),
        lambda b: ShardedData(_tokens(64, 0), b, val=_tokens(36, 1), predict=_tokens(20, 2), collate=ColumnMajor),
    ),
    # torchmetrics objects in training and evaluation steps
    "mlp_metrics": (MetricMLP, lambda b: ShardedData(table_data(64), b, val=table_data(36), predict=table_data(20))),
    # eval mode must use the running statistics, which live on their stage's rank
    "cnn_bn": (EvalBatchNormCNN, lambda b: ShardedData(image_data(64), b, val=image_data(36), predict=image_data(20))),
}


class EvalRecorder(L.Callback):
    """Validation metrics of each validation inside ``fit``, whether the parameters stayed
    partitioned during it, the test step's returned per-sample values, and which evaluation
    steps ran through the pipeline."""

    def __init__(self) -> None:
        self.fit_validations: list[dict[str, float]] = []
        self.partitioned_during_validation: list[bool] = []
        self.test_outputs: list[torch.Tensor] = []
        self.pipelined_steps: set[str] = set()
        self.fit_train_metrics: dict[str, float] = {}

    def on_validation_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.partitioned_during_validation.append(any(p.is_meta for p in module.parameters()))

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            metrics = trainer.callback_metrics
            self.fit_validations.append({k: float(v) for k, v in sorted(metrics.items()) if k.startswith("val_")})

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        self.fit_train_metrics = {k: float(v) for k, v in sorted(metrics.items()) if k.startswith("train_")}

    def on_test_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, *args: Any) -> None:
        if outputs is not None:
            self.test_outputs.append(outputs["per_sample"])

    def _note_pipelined(self, trainer: L.Trainer) -> None:
        pipeline = _pipeline(trainer)
        self.pipelined_steps |= set(pipeline.evaluation.pipelined_steps if pipeline is not None else [])

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._note_pipelined(trainer)

    def on_test_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._note_pipelined(trainer)

    def on_predict_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._note_pipelined(trainer)


def _pipeline(trainer: L.Trainer) -> Any:
    """The strategy's built pipeline (``None`` for other strategies, or before the first batch)."""
    return getattr(getattr(trainer.strategy, "engine", None), "pipeline", None)


def run_evaluation(
    case: str, out_dir: Path, label: str, batch_scale: int = 1, weights: Path | None = None, **trainer_kwargs: Any
) -> None:
    """Fit (unless ``weights`` are given: then load them), validate, test, predict; write
    ``<label>_rank<r>.json`` and ``<label>_rank<r>.pt`` (tensors), and after a fit
    ``<label>_weights.pt`` (the final state dict, from rank 0)."""
    make_model, make_data = EVAL_CASES[case]
    recorder = EvalRecorder()
    options: dict[str, Any] = dict(
        accelerator="cpu",
        max_steps=4,
        val_check_interval=2,
        num_sanity_val_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer = L.Trainer(**{**options, **trainer_kwargs})
    L.seed_everything(0, verbose=False)
    model = make_model()
    data = make_data(8 * batch_scale)
    if weights is None:
        trainer.fit(model, datamodule=data)
        if trainer.global_rank == 0:
            torch.save(model.state_dict(), out_dir / f"{label}_weights.pt")
    else:
        model.load_state_dict(torch.load(weights))
    validated = trainer.validate(model, datamodule=data, verbose=False)
    tested = trainer.test(model, datamodule=data, verbose=False)
    predicted = trainer.predict(model, datamodule=data)
    rank = trainer.global_rank
    record = {
        "fit_validations": recorder.fit_validations,
        "fit_train_metrics": recorder.fit_train_metrics,
        "partitioned_during_validation": recorder.partitioned_during_validation,
        "validated": validated,
        "tested": tested,
        "pipelined_steps": sorted(recorder.pipelined_steps),
    }
    (out_dir / f"{label}_rank{rank}.json").write_text(json.dumps(record))
    tensors = {"predictions": torch.cat(predicted)}
    if recorder.test_outputs:
        tensors["per_sample"] = torch.cat(recorder.test_outputs)
    torch.save(tensors, out_dir / f"{label}_rank{rank}.pt")


def load_evaluation(out_dir: Path, label: str, rank: int) -> dict[str, Any]:
    record = json.loads((out_dir / f"{label}_rank{rank}.json").read_text())
    record.update(torch.load(out_dir / f"{label}_rank{rank}.pt"))
    return record


def run_with_callbacks(out_dir: Path, label: str, **trainer_kwargs: Any) -> None:
    """Epochs with validation, ModelCheckpoint and EarlyStopping on validation metrics,
    LearningRateMonitor, CSV and TensorBoard loggers, the progress bar and the model summary;
    write what the callbacks decided to ``<label>_rank<r>.json``."""
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    checkpoint = ModelCheckpoint(dirpath=out_dir / f"{label}_checkpoints", monitor="val_loss", save_top_k=1)
    # val_acc cannot improve by 1: the run stops at its second validation
    stopping = EarlyStopping(monitor="val_acc", mode="max", patience=0, min_delta=1.0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=4,
        limit_train_batches=4,
        logger=[CSVLogger(out_dir, name=label, version=0), TensorBoardLogger(out_dir, name=f"{label}_tb", version=0)],
        callbacks=[checkpoint, stopping, LearningRateMonitor(logging_interval="step")],
        log_every_n_steps=1,
        enable_progress_bar=True,
        enable_model_summary=True,
        **trainer_kwargs,
    )
    L.seed_everything(0, verbose=False)
    trainer.fit(EvalGPT(layers=4, dim=32, seq_len=16), datamodule=_gpt_data(8))
    record = {
        "stopped_epoch": stopping.stopped_epoch,
        "epochs_run": trainer.current_epoch,
        "best_model_score": float(checkpoint.best_model_score),
        "best_model_path": Path(checkpoint.best_model_path).name,
        "csv": (out_dir / label / "version_0" / "metrics.csv").read_text() if trainer.global_rank == 0 else "",
    }
    (out_dir / f"{label}_rank{trainer.global_rank}.json").write_text(json.dumps(record))
