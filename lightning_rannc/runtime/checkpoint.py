"""Sharded checkpoints: each rank writes the tensors it holds, nobody gathers the model.

The layout is Lightning's own for sharded checkpoints (``FSDPStrategy(state_dict_type="sharded")``):
a directory written by ``torch.distributed.checkpoint`` holding ``model`` (the module's state
dict, under its own keys) and ``optimizer_0``, ``optimizer_1``, ... (each the full optimizer
state dict's structure, every rank contributing the state of the parameters its optimizer
updates), plus ``meta.pt`` with everything else (loops, callbacks, schedulers). Writing is
collective; the directory is complete only once ``torch.distributed.checkpoint`` has written
its ``.metadata`` file, so a crash mid-save leaves a directory that refuses to load.

``torch.distributed.checkpoint`` turns the optimizer state's integer keys into strings: loading
(and ``consolidate``) turns them back, or ``Optimizer.load_state_dict`` would skip the state.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from lightning.fabric.utilities.load import _METADATA_FILENAME, _load_distributed_checkpoint

from lightning_rannc.errors import RuntimeSetupError

__all__ = ["save_sharded", "load_sharded", "consolidate", "is_sharded", "integer_state_keys"]


def is_sharded(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def save_sharded(checkpoint: dict[str, Any], path: Path, is_rank_zero: bool) -> None:
    """Write ``checkpoint`` (this rank's ``state_dict`` and ``optimizer_states`` shares, and the
    rest, the same on every rank) under the directory ``path``. Collective."""
    if path.is_file():
        raise RuntimeSetupError(
            f"A sharded checkpoint is a directory, but {str(path)!r} is a file: remove it or choose another path."
        )
    path.mkdir(parents=True, exist_ok=True)
    rest = dict(checkpoint)
    shards: dict[str, Any] = {"model": rest.pop("state_dict")}
    for index, state in enumerate(rest.pop("optimizer_states", [])):
        shards[f"optimizer_{index}"] = state
    dcp.save(shards, checkpoint_id=path)
    if is_rank_zero:
        torch.save(rest, path / _METADATA_FILENAME)


def load_sharded(path: str | Path) -> dict[str, Any]:
    """A sharded checkpoint as one ordinary checkpoint dict (full tensors, in memory)."""
    path = Path(path)
    if not is_sharded(path):
        raise RuntimeSetupError(
            f"{str(path)!r} is not a complete sharded checkpoint (no .metadata): was its writing interrupted?"
        )
    checkpoint = _load_distributed_checkpoint(path)
    checkpoint["state_dict"] = checkpoint.pop("model")
    count = sum(1 for key in checkpoint if key.startswith("optimizer_") and key[len("optimizer_") :].isdigit())
    if count:
        checkpoint["optimizer_states"] = [checkpoint.pop(f"optimizer_{i}") for i in range(count)]
    return integer_state_keys(checkpoint)


def integer_state_keys(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Optimizer states with the integer parameter indices ``Optimizer.load_state_dict`` expects
    (a checkpoint consolidated by Lightning's own utility has them as strings)."""
    for state in checkpoint.get("optimizer_states", []):
        entries: Mapping[Any, Any] = state.get("state", {})
        state["state"] = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in entries.items()}
    return checkpoint


def consolidate(path: str | Path, output: str | Path) -> None:
    """Write the sharded checkpoint ``path`` as one file that plain Lightning loads."""
    torch.save(load_sharded(path), output)
