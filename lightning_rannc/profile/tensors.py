"""Sizes of the captured step's tensors, as the planner reads them."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lightning_rannc.plan.memory import TensorTable

__all__ = ["tensor_table"]


def tensor_table(tensors: Mapping[str, torch.Tensor]) -> TensorTable:
    """Bytes, element counts and trainable names of a graph's tensors (real, fake or meta)."""
    return TensorTable(
        nbytes={n: t.numel() * t.element_size() for n, t in tensors.items()},
        numel={n: t.numel() for n, t in tensors.items()},
        trainable=frozenset(n for n, t in tensors.items() if isinstance(t, nn.Parameter) and t.requires_grad),
    )
