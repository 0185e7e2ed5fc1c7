"""The exact min-max split (``solver.min_max_partition``) against brute force, as the search calls it."""

import itertools
import math
import random

import pytest

from lightning_rannc.errors import PlanError
from lightning_rannc.plan.cost_model import BlockCost
from lightning_rannc.plan.memory import TensorTable
from lightning_rannc.plan.search import SearchSettings, search_plan
from lightning_rannc.plan.solver import min_max_partition

from helpers.devices import test_device


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

    # as the search forbids a stage: an infinite cost (here, a stage starting at a cut not allowed),
    # with a lower bound that ignores what is forbidden
    def stage_cost(_: int, a: int, b: int) -> float:
        return _cost(costs, cut, a, b) if allowed[a] else math.inf

    found = min_max_partition(num_blocks, num_stages, stage_cost, lower_bound=lambda _, a, b: _cost(costs, cut, a, b))
    expected = _brute_force(costs, cut, num_stages, allowed)
    if expected == float("inf"):
        assert found is None
        return
    assert found is not None
    bounds, value = found
    assert value == pytest.approx(expected)
    assert bounds[0] == 0 and bounds[-1] == num_blocks and len(bounds) == num_stages + 1
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    assert all(allowed[b] for b in bounds[1:-1])
    assert max(_cost(costs, cut, a, b) for a, b in zip(bounds, bounds[1:])) == pytest.approx(value)
    without_bound = min_max_partition(num_blocks, num_stages, stage_cost)
    assert without_bound is not None and without_bound[1] == pytest.approx(value)


def test_balanced_chain_is_split_evenly() -> None:
    found = min_max_partition(8, 4, lambda _, a, b: float(b - a))
    assert found == ([0, 2, 4, 6, 8], 2.0)


def test_more_stages_than_blocks_is_refused_with_advice() -> None:
    assert min_max_partition(3, 4, lambda _, a, b: 1.0) is None
    blocks = [
        BlockCost(start=k, end=k + 1, fwd_ms=1.0, bwd_ms=2.0, activation_bytes=10, cut_bytes=10, tensor_names=("w",))
        for k in range(3)
    ]
    device = test_device()
    settings = SearchSettings(num_devices=4, global_batch_size=4, device=device, pipeline_stages=4)
    with pytest.raises(PlanError, match=r"pipeline_stages=4 .* there are 3 blocks to split"):
        search_plan(
            blocks,
            reference_microbatch_size=1,
            settings=settings,
            tensors=TensorTable({"w": 40}, {"w": 10}, frozenset({"w"})),
            graph_fingerprint="abc",
        )
