"""Exact split of a chain of blocks into contiguous stages minimising the slowest stage.

Let ``c(i, j)`` be the cost of a stage made of blocks ``i .. j-1`` (its compute plus sending its
outputs). With ``best[s][j]`` the smallest possible bottleneck when blocks ``0 .. j-1`` form
``s`` stages::

    best[1][j] = c(0, j)
    best[s][j] = min over s-1 <= i < j of max(best[s-1][i], c(i, j))

and the answer is ``best[S][B]`` for ``B`` blocks. A cost of ``inf`` forbids a stage (a cut that is
not allowed, a stage that does not fit in memory). ``O(S * B^2)`` evaluations of ``c``; ``c`` is
O(1) with prefix sums. The search (``search.py``) gives ``c`` the stage's index too: a stage's
memory (micro-batches in flight) and its link to the next depend on its pipeline position.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["min_max_partition"]


def min_max_partition(
    num_blocks: int,
    num_stages: int,
    stage_cost: Callable[[int, int, int], float],
    lower_bound: Callable[[int, int, int], float] | None = None,
) -> tuple[list[int], float] | None:
    """The DP of the module docstring with a stage cost that may depend on the stage's index:
    ``stage_cost(s, i, j)`` for stage ``s`` holding blocks ``i .. j-1``; ``inf`` forbids it
    (a cut that is not allowed, a stage that does not fit in memory). None if nothing fits.

    ``lower_bound(s, i, j) <= stage_cost(s, i, j)`` must not decrease as the stage takes more
    blocks (smaller ``i``); the inner loop stops once it reaches the best value so far. Without
    it every start is tried.
    """
    if num_stages > num_blocks:
        return None
    best = [[math.inf] * (num_blocks + 1) for _ in range(num_stages + 1)]
    choice = [[-1] * (num_blocks + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        previous, current = best[s - 1], best[s]
        for j in range(s, num_blocks - (num_stages - s) + 1):
            for i in range(j - 1, s - 2, -1):
                if previous[i] == math.inf:
                    continue
                if lower_bound is not None and lower_bound(s - 1, i, j) >= current[j]:
                    break
                cost = stage_cost(s - 1, i, j)
                value = max(previous[i], cost)
                if value < current[j]:
                    current[j], choice[s][j] = value, i
    if best[num_stages][num_blocks] == math.inf:
        return None
    return _boundaries(choice, num_stages, num_blocks), best[num_stages][num_blocks]


def _boundaries(choice: list[list[int]], num_stages: int, num_blocks: int) -> list[int]:
    bounds, j = [num_blocks], num_blocks
    for s in range(num_stages, 0, -1):
        j = choice[s][j]
        bounds.append(j)
    return bounds[::-1]
