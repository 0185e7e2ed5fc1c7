"""Exact split of a chain of blocks into contiguous stages minimising the slowest stage.

Let ``c(i, j)`` be the cost of a stage made of blocks ``i .. j-1`` (its compute plus sending its
outputs). With ``best[s][j]`` the smallest possible bottleneck when blocks ``0 .. j-1`` form
``s`` stages::

    best[1][j] = c(0, j)
    best[s][j] = min over s-1 <= i < j of max(best[s-1][i], c(i, j))

and the answer is ``best[S][B]`` for ``B`` blocks. Cuts where ``allowed[i]`` is False are skipped.
``O(S * B^2)`` evaluations of ``c``; ``c`` is O(1) with prefix sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from lightning_rannc.errors import PlanError

__all__ = ["solve_min_max_partition"]


def solve_min_max_partition(
    num_blocks: int,
    num_stages: int,
    stage_cost: Callable[[int, int], float],
    allowed: Sequence[bool] | None = None,
) -> tuple[list[int], float]:
    """Split ``num_blocks`` blocks into ``num_stages`` non-empty contiguous stages.

    Args:
        num_blocks: number of blocks ``B``.
        num_stages: number of stages ``S``.
        stage_cost: ``c(i, j)``, cost of a stage holding blocks ``i .. j-1``.
        allowed: ``allowed[i]`` says whether a stage may start at block ``i`` (length ``B``).

    Returns:
        The stage boundaries ``[0, b1, ..., B]`` and the bottleneck cost.

    Raises:
        PlanError: fewer blocks (or allowed cuts) than stages.
    """
    if num_stages < 1:
        raise PlanError(f"The number of stages must be at least 1, got {num_stages}.")
    if num_stages > num_blocks:
        raise PlanError(
            f"Cannot split a graph of {num_blocks} block(s) into {num_stages} stages: "
            "use fewer pipeline stages (fewer devices), or a larger model."
        )
    ok = list(allowed) if allowed is not None else [True] * num_blocks
    best = [[math.inf] * (num_blocks + 1) for _ in range(num_stages + 1)]
    choice = [[-1] * (num_blocks + 1) for _ in range(num_stages + 1)]
    for j in range(1, num_blocks + 1):
        best[1][j] = stage_cost(0, j)
    for s in range(2, num_stages + 1):
        for j in range(s, num_blocks + 1):
            for i in range(s - 1, j):
                if ok[i] and best[s - 1][i] < math.inf:
                    value = max(best[s - 1][i], stage_cost(i, j))
                    if value < best[s][j]:
                        best[s][j], choice[s][j] = value, i
    if best[num_stages][num_blocks] == math.inf:
        raise PlanError(
            f"No way to cut the graph into {num_stages} stages at the allowed points "
            f"({sum(ok[1:])} allowed cuts): use fewer pipeline stages."
        )
    return _boundaries(choice, num_stages, num_blocks), best[num_stages][num_blocks]


def _boundaries(choice: list[list[int]], num_stages: int, num_blocks: int) -> list[int]:
    bounds, j = [num_blocks], num_blocks
    for s in range(num_stages, 1, -1):
        j = choice[s][j]
        bounds.append(j)
    bounds.append(0)
    return bounds[::-1]
