"""One rank decides, every rank gets the answer or its error.

Planning runs on rank 0 only (profiling on every rank would cost N times as much, and could
disagree); the other ranks wait in a broadcast. If rank 0 fails, the others must not wait for a
plan that never comes: the error itself is broadcast, and every rank raises it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

__all__ = ["decided_on_rank_zero"]

T = TypeVar("T")


def decided_on_rank_zero(decide: Callable[[], T], rank: int, group: Any = None) -> T:
    """``decide()`` on rank 0 of ``group``; its result (or its exception, raised) on every rank.

    Args:
        decide: what rank 0 computes; other ranks never call it.
        rank: this process's rank in ``group`` (its global rank for the default group).
        group: the process group to share the answer in; ``None``: the default group.

    Returns:
        What ``decide`` returned on rank 0.

    Raises:
        Exception: whatever ``decide`` raised on rank 0, on every rank.
    """
    payload: list[Any] = [None]
    if rank == 0:
        try:
            payload[0] = (True, decide())
        except Exception as error:  # every rank must learn of the failure, not wait for an answer
            payload[0] = (False, error)
    if dist.is_initialized():
        src = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast_object_list(payload, src=src, group=group)
    succeeded, value = payload[0]
    if not succeeded:
        raise value
    return value  # type: ignore[no-any-return]
