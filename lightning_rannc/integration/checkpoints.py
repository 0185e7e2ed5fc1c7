"""Checkpoints of a partitioned module: full (one file, gathered on rank 0) or sharded (a
directory, each rank writing its own tensors through ``torch.distributed.checkpoint``).

Until the first training batch every rank holds the whole module, and Lightning's own logic
applies; after it, each rank holds only its stages' tensors and the optimizer state it owns.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.optim import Optimizer

from lightning_rannc._compat import optimizer_of
from lightning_rannc.capture.module_state import has_meta_tensors
from lightning_rannc.runtime.checkpoint import (
    integer_state_keys,
    is_sharded,
    load_sharded,
    load_sharded_lazily,
    save_sharded,
)
from lightning_rannc.runtime.weights import load_checkpoint_later

if TYPE_CHECKING:
    from lightning_rannc.runtime.built import BuiltPipeline
    from lightning_rannc.strategy import RaNNCStrategyMixin as RaNNCStrategy

__all__ = ["module_state", "optimizer_state", "save", "load_module_state", "load_optimizer_states", "load"]


def _pipeline(strategy: RaNNCStrategy) -> BuiltPipeline | None:
    return strategy.engine.pipeline if strategy.engine is not None else None


def module_state(strategy: RaNNCStrategy) -> dict[str, Any] | None:
    """The module's state dict as this rank contributes it; ``None``: Lightning's own."""
    pipeline = _pipeline(strategy)
    if pipeline is None:
        return None
    return pipeline.local_state_dict() if _sharded(strategy) else pipeline.full_state_dict(dst=0)


def optimizer_state(strategy: RaNNCStrategy, optimizer: Optimizer) -> dict[str, Any] | None:
    """The optimizer's state as this rank contributes it; ``None``: Lightning's own."""
    pipeline = _pipeline(strategy)
    if pipeline is None:
        return None
    optimizer = optimizer_of(optimizer)
    index = [optimizer_of(o) for o in strategy.optimizers].index(optimizer)
    if _sharded(strategy):
        return pipeline.local_optimizer_state(optimizer, index)
    return pipeline.full_optimizer_state(optimizer, index, dst=0)


def save(strategy: RaNNCStrategy, checkpoint: dict[str, Any], filepath: Any) -> bool:
    """Write a sharded checkpoint (every rank); ``False``: a full one, which Lightning writes."""
    if not _sharded(strategy):
        return False
    save_sharded(checkpoint, Path(strategy.broadcast(str(filepath))), strategy.is_global_zero, strategy.barrier)
    return True


def load_module_state(strategy: RaNNCStrategy, checkpoint: Mapping[str, Any], strict: bool) -> bool:
    """Resume a module that has meta tensors (created on the meta device, or partitioned by a
    ``fit``): each rank takes from the checkpoint only the tensors it holds, when it holds them
    (at the first batch, or now if the pipeline exists). ``False``: a whole module, which
    Lightning loads itself."""
    module = strategy.lightning_module
    if module is None or not has_meta_tensors(module):
        return False
    load_checkpoint_later(module, checkpoint["state_dict"], strict)
    engine = strategy.engine
    evaluating = module.trainer.state.fn != "fit"  # a fit plans again, and loads at its build
    if evaluating and engine is not None and engine.pipeline is not None and engine.module is module:
        engine.pipeline.apply_pending_loads()
    return True


def load_optimizer_states(strategy: RaNNCStrategy, checkpoint: Mapping[str, Any]) -> bool:
    """The optimizer states of a module created on the meta device, before its first batch:
    kept until each rank's stages exist, then each rank loads its share. ``False``: Lightning's."""
    engine = strategy.engine
    if engine is None or engine.pipeline is not None or not engine.from_meta:
        return False
    engine.pending_optimizer_states = list(checkpoint.get("optimizer_states", []))
    return True


def load(path: Any, load_full: Any, module: Any = None, weights_only: bool | None = None) -> Mapping[str, Any]:
    """Read a checkpoint: a sharded directory, or through ``load_full`` (Lightning's) a file.
    A whole module (every rank holds it until the first batch) reads every tensor; for a
    ``module`` with meta tensors a local file is memory-mapped, so each rank reads only the
    pages of the tensors it takes."""
    partial = has_meta_tensors(module)
    if is_sharded(path):
        return load_sharded_lazily(path) if partial else load_sharded(path)
    if partial and Path(path).is_file():
        return integer_state_keys(torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only))
    return integer_state_keys(load_full(path))


def _sharded(strategy: RaNNCStrategy) -> bool:
    return strategy.config.state_dict_type == "sharded"
