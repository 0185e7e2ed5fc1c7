"""Which tensors live on which rank: freeing other stages' tensors, gathering full state.

A rank keeps only its stage's parameters and buffers; the others are replaced by meta tensors
of the same shape in the user's module (no memory, shapes still visible to summaries). Full
state is gathered only when asked: a checkpoint, or at the end of ``fit``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_rannc.runtime.gather import gather_state

__all__ = ["release_tensors", "install_tensors", "gather_tensors", "local_tensors"]


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
    made: dict[str, torch.Tensor] = {}  # tied names stay tied: one meta tensor per canonical name
    for path, canonical in aliases.items():
        if canonical in kept:
            continue
        if canonical not in made:
            tensor = _get_tensor(module, path)
            meta = torch.empty_like(tensor, device="meta")
            made[canonical] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
        _set_tensor(module, path, made[canonical])


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


def local_tensors(tensors: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """This rank's tensors by canonical name, where they are (``gather_tensors`` copies each
    bucket to the CPU as it sends it, not the whole share at once)."""
    return {n: tensors[n].detach() for n in names}


def gather_tensors(local: Mapping[str, Any], dst: int | None, group: Any = None) -> dict[str, Any]:
    """Merge every rank's ``local`` dict on rank ``dst`` (``None``: on every rank), as CPU
    tensors, in bounded pieces over the CPU ``group`` (``runtime/gather.py``). Collective."""
    return gather_state(local, dst, group)
