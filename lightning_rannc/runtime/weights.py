"""Weights from a file for a module that may exist only on the meta device.

``load_pretrained(module, source)`` is the one call a user makes (``lightning_rannc.load_pretrained``):
for a module with real tensors it loads at once, like ``load_state_dict``; for one created on
the meta device it notes the source on the module, and each rank reads from it only the
tensors of its own stages when it materialises them (``apply_pending_loads``, called by the
engine after initialisation). Resuming a module created on the meta device goes the same way,
with the checkpoint's state dict as the source.

Keys are the submodule's own: a transformers model kept as ``self.model`` of a LightningModule
reads its ``save_pretrained`` directory under the bare transformers names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lightning_rannc.capture.module_state import canonical_names, has_meta_tensors
from lightning_rannc.runtime.sources import TensorSource, match_keys, open_source

__all__ = ["load_pretrained", "load_checkpoint_later", "apply_pending_loads", "has_pending_loads"]

_PENDING = "_rannc_pending_load"
"""The attribute of a module that holds its ``PendingLoad`` until its tensors exist."""


@dataclass(frozen=True)
class PendingLoad:
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor]
    strict: bool


def load_pretrained(
    module: nn.Module, source: str | os.PathLike[str] | Mapping[str, torch.Tensor], *, strict: bool = True
) -> nn.Module:
    """Load ``module``'s parameters and persistent buffers from ``source``: a transformers
    ``save_pretrained`` directory (safetensors, sharded or not, or ``pytorch_model.bin``), a
    ``.safetensors`` file, a torch state dict or Lightning checkpoint file (read with ``mmap``),
    a ``torch.distributed.checkpoint`` directory, or a state dict in memory.

    Keys are ``module``'s own (``module.state_dict()``'s), with transformers' base-model prefix
    added or dropped where needed. Missing, unexpected (with ``strict``) and wrongly shaped keys
    raise ``RuntimeSetupError`` naming them, before anything is loaded.

    A module created on the meta device (``trainer.init_module(empty_init=True)``, or in
    ``configure_model``) is loaded later, by each rank for its own stages only: no rank reads or
    holds the whole model. Returns ``module``.
    """
    pending = PendingLoad(source, strict)
    if has_meta_tensors(module):
        _check(module, pending)  # a wrong file or prefix fails now, not at the first batch
        setattr(module, _PENDING, pending)
        return module
    _, aliases, tensors = canonical_names(module)
    _load(module, "", pending, aliases, tensors)
    return module


def load_checkpoint_later(root: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool) -> None:
    """Resume ``root``, created on the meta device, from a checkpoint's ``state_dict`` when its
    tensors exist: it replaces every source noted so far (the checkpoint holds every tensor)."""
    for child in root.modules():
        if hasattr(child, _PENDING):
            delattr(child, _PENDING)
    load_pretrained(root, state_dict, strict=strict)


def has_pending_loads(root: nn.Module) -> bool:
    return any(hasattr(child, _PENDING) for child in root.modules())


def apply_pending_loads(
    root: nn.Module, aliases: Mapping[str, str], targets: Mapping[str, torch.Tensor], keep: bool = False
) -> None:
    """Copy into ``targets`` (canonical name -> a materialised tensor of ``root``) the values
    noted by ``load_pretrained`` on ``root`` or its submodules, outer modules first (a
    submodule's own source wins); the notes are then removed, unless ``keep`` (a later plan
    will read them again). Every rank checks every key."""
    loads = [
        (path, child, getattr(child, _PENDING)) for path, child in root.named_modules() if hasattr(child, _PENDING)
    ]
    for path, child, pending in loads:
        _load(child, f"{path}." if path else "", pending, aliases, targets)
    for _, child, _ in [] if keep else loads:
        delattr(child, _PENDING)


def _load(
    module: nn.Module,
    prefix: str,
    pending: PendingLoad,
    aliases: Mapping[str, str],
    targets: Mapping[str, torch.Tensor],
) -> None:
    """Check ``pending``'s keys against ``module`` (at ``prefix`` in the root whose ``aliases``
    name its tensors) and read from it only the tensors in ``targets``."""
    wanted = _wanted(module)
    local = {key: aliases[prefix + key] for key in wanted}
    source = open_source(pending.source)
    matched = _match(source, module, prefix, pending, wanted, local)
    mine = {canonical: key for canonical, key in matched.items() if canonical in targets}
    values = source.read(sorted(set(mine.values())))
    with torch.no_grad():
        for canonical, key in mine.items():
            targets[canonical].copy_(values[key])


def _check(module: nn.Module, pending: PendingLoad) -> None:
    wanted = _wanted(module)
    _match(open_source(pending.source), module, "", pending, wanted, canonical_names(module)[1])


def _match(
    source: TensorSource,
    module: nn.Module,
    prefix: str,
    pending: PendingLoad,
    wanted: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    aliases: Mapping[str, str],
) -> dict[str, str]:
    at = f" at `{prefix[:-1]}`" if prefix else ""
    return match_keys(
        source,
        wanted,
        {key: aliases[key] for key in wanted},
        where=f"{type(module).__name__}{at}",
        base_model_prefix=getattr(module, "base_model_prefix", "") or "",
        strict=pending.strict,
    )


def _wanted(module: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every key of ``module.state_dict()`` (persistent buffers only)."""
    return {key: (tuple(t.shape), t.dtype) for key, t in module.state_dict(keep_vars=True).items()}
