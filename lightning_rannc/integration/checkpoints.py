"""Checkpoints of a partitioned module: full (one file, gathered on rank 0) or sharded (a
directory, each rank writing its own tensors through ``torch.distributed.checkpoint``).

Until the first training batch every rank holds the whole module, and Lightning's own logic
applies; after it, each rank holds only its stages' tensors and the optimizer state it owns.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.optim import Optimizer

from lightning_rannc._compat import optimizer_of
from lightning_rannc.errors import RuntimeSetupError
from lightning_rannc.runtime.checkpoint import integer_state_keys, is_sharded, load_sharded, save_sharded

if TYPE_CHECKING:
    from lightning_rannc.runtime.built import BuiltPipeline
    from lightning_rannc.strategy import RaNNCStrategyMixin as RaNNCStrategy

__all__ = ["module_state", "optimizer_state", "save", "check_loadable", "load"]


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


def check_loadable(module: Any) -> None:
    """Refuse to load a checkpoint into meta tensors: torch only warns, and each rank would
    then initialise its stage afresh, resuming from random weights."""
    if module is not None and any(t.is_meta for t in module.state_dict().values()):
        raise RuntimeSetupError(
            f"{type(module).__name__} was created on the meta device (`trainer.init_module(empty_init=True)`); "
            "resuming it from a checkpoint is not supported yet. Create it normally to resume, or load the "
            "weights yourself after the first step."
        )


def load(path: Any, load_full: Any) -> Mapping[str, Any]:
    """Read a checkpoint: a sharded directory, or through ``load_full`` (Lightning's) a file.
    The module is whole on every rank until the first batch: each rank reads every tensor."""
    if is_sharded(path):
        return load_sharded(path)
    return integer_state_keys(load_full(path))


def _sharded(strategy: RaNNCStrategy) -> bool:
    return strategy.config.state_dict_type == "sharded"
