"""Sharded checkpoints: each rank writes the tensors it holds, nobody gathers the model.

The layout is Lightning's own for sharded checkpoints (``FSDPStrategy(state_dict_type="sharded")``):
a directory written by ``torch.distributed.checkpoint`` holding ``model`` (the module's state
dict, under its own keys) and ``optimizer_0``, ``optimizer_1``, ... (each the full optimizer
state dict's structure, every rank contributing the state of the parameters its optimizer
updates), plus ``meta.pt`` with everything else (loops, callbacks, schedulers). Writing is
collective, into ``<path>.partial``, which rank 0 renames to ``path`` once every file is there:
a crash mid-save leaves the previous checkpoint as it was (a half-written directory would
mix the new weights with the old loop state).

``torch.distributed.checkpoint`` turns the optimizer state's integer keys into strings: loading
(and ``consolidate``) turns them back, or ``Optimizer.load_state_dict`` would skip the state.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from lightning_rannc._compat import LIGHTNING_METADATA_FILENAME, load_distributed_checkpoint
from lightning_rannc.errors import RuntimeSetupError
from lightning_rannc.runtime.sources import SourceMapping, open_source

__all__ = [
    "save_sharded",
    "load_sharded",
    "load_sharded_lazily",
    "LazyStates",
    "consolidate",
    "is_sharded",
    "integer_state_keys",
]


def is_sharded(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / LIGHTNING_METADATA_FILENAME).is_file()


def save_sharded(
    checkpoint: dict[str, Any], path: Path, is_rank_zero: bool, barrier: Callable[[], None] = lambda: None
) -> None:
    """Write ``checkpoint`` (this rank's ``state_dict`` and ``optimizer_states`` shares, and the
    rest, the same on every rank) as the directory ``path``. Collective (``barrier`` syncs ranks)."""
    if path.is_file():
        raise RuntimeSetupError(
            f"A sharded checkpoint is a directory, but {str(path)!r} is a file: remove it or choose another path."
        )
    staging = path.with_name(path.name + ".partial")
    if is_rank_zero:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    rest = dict(checkpoint)
    shards: dict[str, Any] = {"model": rest.pop("state_dict")}
    for index, state in enumerate(rest.pop("optimizer_states", [])):
        shards[f"optimizer_{index}"] = state
    dcp.save(shards, checkpoint_id=staging)
    if is_rank_zero:
        torch.save(rest, staging / LIGHTNING_METADATA_FILENAME)
        _replace_directory(staging, path)
    barrier()


def _replace_directory(new: Path, path: Path) -> None:
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    new.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def load_sharded(path: str | Path) -> dict[str, Any]:
    """A sharded checkpoint as one ordinary checkpoint dict (full tensors, in memory)."""
    checkpoint = load_distributed_checkpoint(_complete(Path(path)))
    checkpoint["state_dict"] = checkpoint.pop("model")
    count = sum(1 for key in checkpoint if key.startswith("optimizer_") and key[len("optimizer_") :].isdigit())
    if count:
        checkpoint["optimizer_states"] = [checkpoint.pop(f"optimizer_{i}") for i in range(count)]
    return integer_state_keys(checkpoint)


def load_sharded_lazily(path: str | Path) -> dict[str, Any]:
    """A sharded checkpoint for a module that exists only in part on each rank: ``meta.pt`` is
    read, tensors only when asked for. ``"state_dict"`` reads key by key (``SourceMapping``), and
    each optimizer state's ``"state"`` one parameter's state at a time, so that each rank reads
    only the tensors it holds."""
    path = _complete(Path(path))
    checkpoint = torch.load(path / LIGHTNING_METADATA_FILENAME, map_location="cpu")  # as Lightning reads it
    checkpoint["state_dict"] = SourceMapping(open_source(path))
    metadata = dcp.FileSystemReader(path).read_metadata()
    entries = metadata.planner_data
    names = sorted({fqn[0] for fqn in entries.values() if str(fqn[0]).startswith("optimizer_")})
    checkpoint["optimizer_states"] = [
        {"state": LazyStates(path, name, metadata), "param_groups": _param_groups(path, name, entries)}
        for name in sorted(names, key=lambda n: int(n[len("optimizer_") :]))
    ]
    return checkpoint


class LazyStates(Mapping[int, dict[str, Any]]):
    """An optimizer's ``state`` in a sharded checkpoint: parameter index -> its state, read when asked for."""

    def __init__(self, path: Path, name: str, metadata: Any) -> None:
        self.path, self.name, self.entries = path, name, metadata.state_dict_metadata
        self.fields: dict[int, dict[str, str]] = {}  # index -> field -> flattened key
        for key, fqn in metadata.planner_data.items():
            if fqn[0] == name and fqn[1] == "state":
                self.fields.setdefault(int(fqn[2]), {})[str(fqn[3])] = key

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.read([index])[index]

    def read(self, indices: Iterable[int]) -> dict[int, dict[str, Any]]:
        """The states of the parameters ``indices`` (those the checkpoint has), in one read."""
        states = {
            index: {field: _placeholder(self.entries[key]) for field, key in self.fields[index].items()}
            for index in indices
            if index in self.fields
        }
        _read(self.path, {self.name: {"state": {str(index): state for index, state in states.items()}}})
        return states

    def __contains__(self, index: object) -> bool:
        return index in self.fields

    def __iter__(self) -> Iterator[int]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)


def _param_groups(path: Path, name: str, entries: Mapping[str, tuple[Any, ...]]) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    for fqn in entries.values():
        if fqn[0] == name and fqn[1] == "param_groups":
            while len(groups) <= int(fqn[2]):
                groups.append({})
            groups[int(fqn[2])][str(fqn[3])] = None  # a value DCP replaces
    _read(path, {name: {"param_groups": groups}})
    return groups


def _placeholder(entry: Any) -> Any:
    if isinstance(entry, TensorStorageMetadata):
        return torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
    return None


def _read(path: Path, state: dict[str, Any]) -> None:
    """Fill ``state``'s entries from the checkpoint, reading only those; no collectives (each
    rank asks for other keys)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=True)


def _complete(path: Path) -> Path:
    if not is_sharded(path):
        raise RuntimeSetupError(
            f"{str(path)!r} is not a complete sharded checkpoint (no .metadata or meta.pt): was its writing "
            "interrupted?"
        )
    return path


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
