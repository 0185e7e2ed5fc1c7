"""A batch as the captured graph sees it: its tensor leaves, and how to rebuild it.

The graph takes tensors only. ``flatten_batch`` splits a batch (a tensor, tuple, dict,
dataclass registered as a pytree, ...) into its tensor leaves and a ``BatchSpec``; the other
leaves (file names, ids) pass through unchanged as long as the step does not compute with them:
while the step is traced each one is an ``OpaqueLeaf`` that refuses any use.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch

from lightning_rannc._compat import TreeSpec, is_registered_pytree, tree_flatten, tree_unflatten
from lightning_rannc.errors import CaptureError, RuntimeSetupError

__all__ = ["BatchSpec", "FlatBatch", "OpaqueLeaf", "batch_size_of", "flatten_batch"]

ShapeKey = tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class BatchSpec:
    """How a batch is rebuilt from its tensor leaves: the pytree structure and the batch's other
    leaves (strings, ids, lists of numbers), which are not graph inputs."""

    tree: TreeSpec
    constants: tuple[Any, ...]
    """Every leaf in order; ``None`` where a tensor goes."""
    tensor_positions: tuple[int, ...]

    def unflatten(self, tensors: list[torch.Tensor], others: list[Any] | None = None) -> Any:
        """The batch with ``tensors`` in the tensor leaves' places, and ``others`` (default: the
        original values) in the other leaves' places."""
        leaves = list(self.constants)
        if others is not None:
            other_positions = [i for i in range(len(leaves)) if i not in self.tensor_positions]
            for position, value in zip(other_positions, others, strict=True):
                leaves[position] = value
        for position, tensor in zip(self.tensor_positions, tensors, strict=True):
            leaves[position] = tensor
        return tree_unflatten(leaves, self.tree)

    def opaque_others(self, where: str, step_name: str) -> list[Any]:
        """Stand-ins for the non-tensor leaves while the step is traced (see ``OpaqueLeaf``);
        ``None`` stays ``None`` (``if mask is not None`` must see it)."""
        return [
            value if value is None else OpaqueLeaf(value, f"`{step_name}` ({where})", index)
            for index, value in enumerate(self.constants)
            if index not in self.tensor_positions
        ]


def flatten_batch(batch: Any, where: str, step_name: str = "training_step") -> tuple[list[torch.Tensor], BatchSpec]:
    """The batch's tensor leaves (the graph's inputs), and how to rebuild the batch from them.
    Other leaves (file names, ids) pass through as long as the step does not use them."""
    named = f"The batch passed to `{step_name}` ({where})"
    _register_dataclasses(batch, named)
    leaves, tree = tree_flatten(batch)
    positions = tuple(i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor))
    if not positions:
        raise CaptureError(f"{named} holds no tensors{_unknown_type_hint(batch)}.")
    constants = tuple(None if i in positions else leaf for i, leaf in enumerate(leaves))
    return [leaves[i] for i in positions], BatchSpec(tree, constants, positions)


def _register_dataclasses(value: Any, named: str) -> None:
    """Dataclass batches are containers like dicts: register their types as pytrees (what
    ``torch.export.register_dataclass`` does), so that their tensor fields become graph inputs.
    A dataclass with fields ``__init__`` does not take cannot be rebuilt that way: refused."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        kind = type(value)
        if not is_registered_pytree(kind):
            fixed = [f.name for f in dataclasses.fields(value) if not f.init]
            if fixed:
                raise CaptureError(
                    f"{named} is a {kind.__qualname__} whose fields {fixed} are not `__init__` arguments, so it "
                    "cannot be rebuilt from its tensors: make them `__init__` fields, or return a dict from "
                    "your DataLoader's collate_fn."
                )
            torch.export.register_dataclass(kind)
        children: list[Any] = [getattr(value, f.name) for f in dataclasses.fields(value)]
    elif isinstance(value, (list, tuple)):
        children = list(value)
    elif isinstance(value, dict):
        children = list(value.values())
    else:
        return
    for child in children:
        _register_dataclasses(child, named)


def _unknown_type_hint(batch: Any) -> str:
    """Why no tensor was found, when the batch is of a type torch's pytrees do not open."""
    if isinstance(batch, (torch.Tensor, list, tuple, dict, str, int, float)) or batch is None:
        return ""
    kind = type(batch).__qualname__
    return (
        f": it is a {kind}, which torch's pytrees do not open, so its tensors are not found. Return a dict, "
        f"tuple or dataclass from your DataLoader's collate_fn, or register {kind} with "
        "`torch.utils._pytree.register_pytree_node`"
    )


def batch_size_of(leaves: list[torch.Tensor], where: str) -> int:
    """The batch size: the first dimension every tensor leaf shares."""
    sizes = {int(leaf.shape[0]) if leaf.dim() else -1 for leaf in leaves}
    if len(sizes) != 1 or -1 in sizes:
        raise RuntimeSetupError(
            f"Every tensor in the batch given to `training_step` ({where}) must have the batch "
            f"size as its first dimension; got first dimensions {sorted(sizes)}."
        )
    return sizes.pop()


@dataclass(frozen=True)
class FlatBatch:
    """A batch flattened once, at the top of a step, and passed down as it is: the structured
    batch, its tensor leaves (the graph's inputs) and how to rebuild it. Nothing below the
    strategy flattens or sizes a batch again."""

    leaves: list[torch.Tensor]
    spec: BatchSpec
    where: str
    """``file:line`` of the step, for errors."""

    @classmethod
    def of(cls, batch: Any, where: str, step_name: str = "training_step") -> FlatBatch:
        leaves, spec = flatten_batch(batch, where, step_name)
        return cls(leaves, spec, where)

    @functools.cached_property
    def size(self) -> int:
        """Samples in the batch (``RuntimeSetupError`` if the leaves disagree)."""
        return batch_size_of(self.leaves, self.where)

    @property
    def shape_key(self) -> ShapeKey:
        """The leaves' shapes: a batch of other shapes needs stages of its own."""
        return tuple(tuple(leaf.shape) for leaf in self.leaves)

    def first_leaves(self, samples: int) -> list[torch.Tensor]:
        """The first ``samples`` samples of every tensor leaf (a micro-batch's inputs)."""
        return [leaf[:samples] for leaf in self.leaves]

    def first(self, samples: int) -> FlatBatch:
        """The batch of the first ``samples`` samples (a micro-batch)."""
        return self.with_leaves(self.first_leaves(samples))

    def with_leaves(self, leaves: list[torch.Tensor]) -> FlatBatch:
        """The same structure with other tensors (fake ones, to capture without memory)."""
        return FlatBatch(leaves, self.spec, self.where)


class OpaqueLeaf:
    """Stands in for a non-tensor leaf of the batch while the step is traced. The captured
    graph takes tensors only, so a step may carry such a leaf along but not compute with it:
    any use raises an error naming it (a value baked into the graph would be stale later)."""

    def __init__(self, value: Any, where: str, position: int) -> None:
        object.__setattr__(self, "_value", value)
        object.__setattr__(self, "_where", where)
        object.__setattr__(self, "batch_position", position)

    def __repr__(self) -> str:
        return f"<batch leaf {object.__getattribute__(self, '_value')!r:.40}>"

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        value, where = object.__getattribute__(self, "_value"), object.__getattribute__(self, "_where")
        raise LeafUsedError(
            f"{where} uses a {type(value).__name__} leaf of its batch ({value!r:.60}). RaNNCStrategy runs the step "
            "as a graph of tensors, captured once: convert it to a tensor in your DataLoader's collate_fn, "
            "or leave it unused in the step."
        )

    def __getattr__(self, name: str) -> Any:
        return self._refuse()


class LeafUsedError(CaptureError, AttributeError):
    """Also an AttributeError: ``hasattr(leaf, "to")`` (device-moving helpers) answers False."""


for _dunder in ("__len__", "__iter__", "__getitem__", "__contains__", "__bool__", "__eq__", "__ne__", "__lt__",
                "__le__", "__gt__", "__ge__", "__hash__", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__",
                "__rmul__", "__truediv__", "__rtruediv__", "__floordiv__", "__mod__", "__neg__", "__int__",
                "__float__", "__index__", "__str__", "__format__", "__call__"):  # fmt: skip
    setattr(OpaqueLeaf, _dunder, OpaqueLeaf._refuse)
