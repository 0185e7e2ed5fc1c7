"""``benchmarks/throughput.py`` reads every rank's lines from one shared, interleaved stdout."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

THROUGHPUT = Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py"


def _throughput():
    spec = importlib.util.spec_from_file_location("throughput_benchmark", THROUGHPUT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_are_read_when_the_ranks_print_at_the_same_moment() -> None:
    stdout = (
        'MEMORY {"rank": 1, "memory": [1, 2]}MEMORY {"rank": 0, "memory": [3, 4]}\n'
        "a warning from rank 1\n"
        'RESULT {"run": "ddp_2proc", "samples_per_s": 5.0}\n'
    )
    throughput = _throughput()
    result = throughput._result(stdout, devices=2)
    assert result == {"run": "ddp_2proc", "samples_per_s": 5.0, "memory": [[3, 4], [1, 2]]}
    # a rank's line lost, or a cut-off record: an error, so that the run is tried again
    with pytest.raises(ValueError, match=r"ranks \[0, 1\], of 3"):
        throughput._result(stdout, devices=3)
    with pytest.raises(ValueError):
        throughput._result('MEMORY {"rank": 0, "mem', devices=1)
