import itertools
import random

import pytest

from lightning_rannc.errors import PlanError
from lightning_rannc.plan.solver import solve_min_max_partition


def _brute_force(costs: list[float], cut: list[float], num_stages: int, allowed: list[bool]) -> float:
    best = float("inf")
    for inner in itertools.combinations(range(1, len(costs)), num_stages - 1):
        if not all(allowed[i] for i in inner):
            continue
        bounds = [0, *inner, len(costs)]
        best = min(best, max(_cost(costs, cut, a, b) for a, b in zip(bounds, bounds[1:])))
    return best


def _cost(costs: list[float], cut: list[float], a: int, b: int) -> float:
    return sum(costs[a:b]) + (cut[b] if b < len(costs) else 0.0)


@pytest.mark.parametrize("seed", range(40))
def test_dynamic_program_finds_the_brute_force_optimum(seed: int) -> None:
    rng = random.Random(seed)
    num_blocks = rng.randint(1, 9)
    num_stages = rng.randint(1, num_blocks)
    costs = [rng.choice([rng.random(), rng.random() * 10, 0.0]) for _ in range(num_blocks)]
    cut = [rng.random() for _ in range(num_blocks + 1)]
    allowed = [True] + [rng.random() > 0.2 for _ in range(num_blocks - 1)]
    expected = _brute_force(costs, cut, num_stages, allowed)
    if expected == float("inf"):
        with pytest.raises(PlanError, match="allowed"):
            solve_min_max_partition(num_blocks, num_stages, lambda a, b: _cost(costs, cut, a, b), allowed)
        return
    bounds, value = solve_min_max_partition(num_blocks, num_stages, lambda a, b: _cost(costs, cut, a, b), allowed)
    assert value == pytest.approx(expected)
    assert bounds[0] == 0 and bounds[-1] == num_blocks and len(bounds) == num_stages + 1
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    assert all(allowed[b] for b in bounds[1:-1])
    assert max(_cost(costs, cut, a, b) for a, b in zip(bounds, bounds[1:])) == pytest.approx(value)


def test_balanced_chain_is_split_evenly() -> None:
    bounds, value = solve_min_max_partition(8, 4, lambda a, b: float(b - a))
    assert bounds == [0, 2, 4, 6, 8]
    assert value == 2.0


def test_more_stages_than_blocks_is_refused_with_advice() -> None:
    with pytest.raises(PlanError, match=r"3 block\(s\) into 4 stages: use fewer pipeline stages"):
        solve_min_max_partition(3, 4, lambda a, b: 1.0)
