"""Gathering state (a full checkpoint, the whole module after ``fit``) in bounded pieces.

``gather_object`` would pickle each rank's whole share into one message: under NCCL that message
goes through the GPU, sized by the largest share times the world size, and every rank waits in
it. Here the ranks first exchange a listing of what they hold (names, shapes, dtypes, and any
non-tensor values: small), then each rank's tensors travel to the receiver in buckets of at most
``BUCKET_BYTES``, over a CPU (gloo) group, by point-to-point messages between that rank and the
receiver only. No GPU buffer is sized by the model and no sender's peak grows by more than one
bucket; the receiver ends with the whole state in CPU memory, which is what it asked for.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist

from lightning_rannc._compat import tree_flatten, tree_unflatten

__all__ = ["gather_state", "BUCKET_BYTES", "buckets"]

BUCKET_BYTES = 256 * 2**20
"""Most bytes one message carries (a larger tensor travels alone)."""


def gather_state(local: Mapping[str, Any], dst: int | None, group: Any = None) -> dict[str, Any]:
    """Merge every rank's ``local`` (name -> tensor, or a pytree of tensors and numbers, e.g.
    an optimizer's per-parameter state) on rank ``dst`` (``None``: on every rank), as CPU
    tensors. ``group``: a CPU (gloo) group over every rank (``None``: the default group, which
    must then be gloo). Collective."""
    flat = {name: tree_flatten(value) for name, value in local.items()}
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {name: tree_unflatten([_cpu(x) for x in leaves], spec) for name, (leaves, spec) in flat.items()}
    listing = [(name, spec, [_describe(x) for x in leaves]) for name, (leaves, spec) in flat.items()]
    listings: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(listings, listing, group=group)
    rank = dist.get_rank()
    merged: dict[str, Any] = {}
    for src, entries in enumerate(listings):
        receives = dst is None or dst == rank
        if src == rank:
            values = {name: [_cpu(x) for x in leaves] for name, (leaves, _) in flat.items()}
        else:
            values = {
                name: [d if not isinstance(d, _TensorInfo) else None for d in infos] for name, _, infos in entries
            }
        _transfer(entries, values, src, dst, rank, group)
        if receives:
            for name, spec, _ in entries:
                merged[name] = tree_unflatten(values[name], spec)
    return merged if dst is None or dst == rank else {}


class _TensorInfo(tuple):  # type: ignore[type-arg]
    """(shape, dtype, bytes) of a tensor leaf in a listing."""

    @property
    def nbytes(self) -> int:
        return int(self[2])


def _describe(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        return _TensorInfo((tuple(leaf.shape), leaf.dtype, leaf.numel() * leaf.element_size()))
    return leaf  # a number or other small value: it travels in the listing


def _cpu(leaf: Any) -> Any:
    return leaf.detach().cpu() if isinstance(leaf, torch.Tensor) else leaf


def _transfer(
    entries: list[Any], values: dict[str, list[Any]], src: int, dst: int | None, rank: int, group: Any
) -> None:
    """Move ``src``'s tensor leaves into ``values`` on the receivers, bucket by bucket."""
    slots = [
        (name, i, info) for name, _, infos in entries for i, info in enumerate(infos) if isinstance(info, _TensorInfo)
    ]
    for bucket in buckets([info.nbytes for _, _, info in slots], BUCKET_BYTES):
        chosen = [slots[k] for k in bucket]
        total = sum(info.nbytes for _, _, info in chosen)
        if rank == src:
            payload = torch.cat([_bytes(values[name][i]) for name, i, _ in chosen])
        else:
            payload = torch.empty(total, dtype=torch.uint8)
        if total == 0:  # empty tensors: every rank knows them from the listing
            pass
        elif dst is None:
            dist.broadcast(payload, src=src, group=group)
        elif src != dst and rank == src:
            dist.send(payload, dst=dst, group=group)
        elif src != dst and rank == dst:
            dist.recv(payload, src=src, group=group)
        if rank != src and (dst is None or rank == dst):
            for (name, i, info), chunk in zip(chosen, payload.split([info.nbytes for _, _, info in chosen])):
                shape, dtype, _ = info
                values[name][i] = chunk.clone().view(dtype).reshape(shape)


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def buckets(sizes: list[int], limit: int) -> Iterator[list[int]]:
    """Indices of ``sizes`` in order, grouped so that each group's total is at most ``limit``
    (a size above it forms a group of its own)."""
    group: list[int] = []
    total = 0
    for index, size in enumerate(sizes):
        if group and total + size > limit:
            yield group
            group, total = [], 0
        group.append(index)
        total += size
    if group:
        yield group
