"""Which tensors live on which rank: freeing other stages' tensors, gathering full state.

A rank keeps only its stage's parameters and buffers; the others are replaced by meta tensors
of the same shape in the user's module (no memory, shapes still visible to summaries). Full
state is gathered only when asked: a checkpoint, or at the end of ``fit``.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_rannc._rng import device_generator
from lightning_rannc.errors import RuntimeSetupError
from lightning_rannc.runtime.gather import gather_state

__all__ = ["release_tensors", "install_tensors", "gather_tensors", "local_tensors", "initialize_tensors"]


def _set_tensor(module: nn.Module, path: str, tensor: torch.Tensor) -> None:
    owner_path, _, leaf = path.rpartition(".")
    owner = module.get_submodule(owner_path)
    is_parameter = leaf in dict(owner.named_parameters(recurse=False, remove_duplicate=False))
    if is_parameter and not isinstance(tensor, nn.Parameter):
        tensor = nn.Parameter(tensor)
    setattr(owner, leaf, tensor)  # registered where the old one was: a parameter, or a buffer


def _get_tensor(module: nn.Module, path: str) -> torch.Tensor:
    owner_path, _, leaf = path.rpartition(".")
    tensor = getattr(module.get_submodule(owner_path), leaf)
    assert tensor is not None, f"{path} is registered as None"
    return tensor


def release_tensors(module: nn.Module, aliases: Mapping[str, str], keep: Iterable[str]) -> None:
    """Replace every parameter/buffer whose canonical name is not in ``keep`` by a meta tensor."""
    kept = set(keep)
    for path, canonical in aliases.items():
        if canonical in kept:
            continue
        tensor = _get_tensor(module, path)
        meta = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
        _set_tensor(module, path, meta)


def install_tensors(
    module: nn.Module, aliases: Mapping[str, str], values: Mapping[str, torch.Tensor], device: torch.device
) -> None:
    """Put gathered values back in place of meta tensors; tied names share one new parameter."""
    made: dict[str, torch.Tensor] = {}
    for path, canonical in aliases.items():
        current = _get_tensor(module, path)
        if not current.is_meta or canonical not in values:
            continue
        if canonical not in made:
            value = values[canonical].to(device=device, dtype=current.dtype)
            made[canonical] = (
                nn.Parameter(value, requires_grad=current.requires_grad) if isinstance(current, nn.Parameter) else value
            )
        _set_tensor(module, path, made[canonical])


def initialize_tensors(module: nn.Module, names: Iterable[str], seed: int, device: torch.device) -> None:
    """Initialise freshly materialised tensors with their modules' ``reset_parameters``.

    Each module draws from a stream seeded by (seed, module path): a tensor gets the same values
    on every rank that holds it and whatever the stage split. ``reset_parameters`` must
    initialise only the module's own tensors, as PyTorch's layers do.
    """
    owners = sorted({name.rpartition(".")[0] for name in names})
    missing = [
        path or "<the LightningModule>"
        for path in owners
        if not hasattr(module.get_submodule(path), "reset_parameters")
    ]
    if missing:
        raise RuntimeSetupError(
            f"The module was created on the meta device, but {missing} define no `reset_parameters()` "
            "to initialise their own parameters and buffers on the rank that holds them. Add one "
            "(it must set only that module's direct tensors), or create the module normally."
        )
    generator = device_generator(device)
    for path in owners:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            # zlib.crc32, not hash(): str hashes differ between processes (PYTHONHASHSEED).
            generator.manual_seed(hash((seed, zlib.crc32(path.encode()))) & (2**63 - 1))
            module.get_submodule(path).reset_parameters()  # type: ignore[operator]


def local_tensors(tensors: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """This rank's tensors by canonical name, where they are (``gather_tensors`` copies each
    bucket to the CPU as it sends it, not the whole share at once)."""
    return {n: tensors[n].detach() for n in names}


def gather_tensors(local: Mapping[str, Any], dst: int | None, group: Any = None) -> dict[str, Any]:
    """Merge every rank's ``local`` dict on rank ``dst`` (``None``: on every rank), as CPU
    tensors, in bounded pieces over the CPU ``group`` (``runtime/gather.py``). Collective."""
    return gather_state(local, dst, group)
