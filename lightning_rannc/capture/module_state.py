"""The module's tensors by canonical name, and fake stand-ins for them.

Tied parameters (an embedding shared with the output head) are one tensor under several
names: ``canonical_names`` gives each tensor the first name it appears under, which the graph,
the plan and checkpoints use. ``fake_module_state`` swaps every tensor for a fake one, so that
the step can be captured again after other stages' tensors were freed, or when the module was
built on the meta device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_rannc._compat import FakeTensorMode

__all__ = ["canonical_names", "module_tensors", "fake_module_state"]


def canonical_names(module: nn.Module) -> tuple[dict[int, str], dict[str, str], dict[str, torch.Tensor]]:
    """``id -> canonical name``, ``name -> canonical name`` and ``canonical name -> tensor``."""
    first_name: dict[int, str] = {}
    aliases: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        aliases[name] = first_name.setdefault(id(tensor), name)
        tensors.setdefault(aliases[name], tensor)
    return first_name, aliases, tensors


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical name -> the module's parameter or buffer object (tied tensors once)."""
    return canonical_names(module)[2]


def has_meta_tensors(module: nn.Module | None) -> bool:
    """Whether some parameter or buffer of ``module`` is on the meta device (created there, or
    another stage's, released)."""
    return module is not None and any(t.is_meta for t in module_tensors(module).values())


@contextlib.contextmanager
def fake_module_state(module: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> Iterator[Any]:
    """Swap every parameter and buffer of ``module`` for a fake tensor on ``device`` (no memory).

    Lets the step be captured again (another batch shape) after other stages' tensors were
    freed: export needs every tensor on one device, and fake tensors cost nothing. Tied tensors
    stay tied. Yields the fake mode; batches must be made fake with ``mode.from_tensor``.
    ``dtype``: the floating-point tensors' fakes take it, as ``module.to(dtype)`` would (a
    ``-true`` precision), while the module itself is left as it was.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes: dict[int, torch.Tensor] = {}
    saved: list[tuple[nn.Module, str, torch.Tensor]] = []
    for owner in module.modules():
        named = [
            *owner.named_parameters(recurse=False, remove_duplicate=False),
            *owner.named_buffers(recurse=False, remove_duplicate=False),
        ]
        for key, tensor in named:
            if id(tensor) not in fakes:
                kind = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                with mode:
                    fake = torch.empty_strided(tensor.shape, tensor.stride(), dtype=kind, device=device)
                is_param = isinstance(tensor, nn.Parameter)
                fakes[id(tensor)] = nn.Parameter(fake, requires_grad=tensor.requires_grad) if is_param else fake
            saved.append((owner, key, tensor))
    for owner, key, tensor in saved:
        setattr(owner, key, fakes[id(tensor)])  # a parameter stays a parameter, a buffer a buffer
    try:
        yield mode
    finally:
        for owner, key, tensor in saved:
            setattr(owner, key, tensor)
