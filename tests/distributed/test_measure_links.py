"""``measure_links`` over real gloo process groups of 2 and 3 CPU ranks (one script run, forked ranks)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from helpers.dist import run_script

pytestmark = pytest.mark.distributed

# (world size, local_world_size) -> (intra-node measured, inter-node measured); as in scripts/measure_links.py.
LAYOUTS = {
    (2, 2): (True, False),
    (2, 1): (False, True),
    (3, 2): (True, True),
    (3, 3): (True, False),
    (3, 1): (False, True),
}


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("links")
    run_script("measure_links.py", str(out), timeout=60)
    return out


def _records(out: Path, world: int, local_world_size: int) -> list[dict]:
    return [json.loads((out / f"w{world}_l{local_world_size}_r{rank}.json").read_text()) for rank in range(world)]


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=lambda layout: f"world{layout[0]}-local{layout[1]}")
def test_every_rank_returns_rank_zeros_measurement(measured: Path, layout: tuple[int, int]) -> None:
    records = _records(measured, *layout)
    links = records[0]["links"]
    intra, inter = LAYOUTS[layout]
    assert (links["intra_node"] is not None, links["inter_node"] is not None) == (intra, inter)
    assert links["allreduce"] is not None
    for record in records[1:]:
        assert record["links"] == links  # identical floats, not merely close
        assert record["describe"] == records[0]["describe"]
    for times in filter(None, links.values()):
        assert math.isfinite(times["latency_ms"]) and times["latency_ms"] > 0
        assert math.isfinite(times["bandwidth"]) and times["bandwidth"] > 0


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=lambda layout: f"world{layout[0]}-local{layout[1]}")
def test_measurement_is_short(measured: Path, layout: tuple[int, int]) -> None:
    assert max(record["seconds"] for record in _records(measured, *layout)) < 1.0


def test_two_ranks_on_one_node_each_measure_only_the_inter_node_link(measured: Path) -> None:
    record = _records(measured, 2, 1)[0]
    assert record["links"]["intra_node"] is None
    assert record["links"]["inter_node"]["bandwidth"] > 0
    assert record["describe"].startswith("links: intra-node -, inter-node ")
