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


def test_medians_over_repetitions_give_the_cost_models_error_apart_from_the_noise(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each run's median predicted/measured step over the repetitions, beside its median speed."""
    repetitions = [
        {
            "lightning_1proc": {"samples_per_s": 100.0},
            "rannc_s2_d1": {"samples_per_s": speed, "ms": ms, "predicted_ms": 110.0},
        }
        for speed, ms in ((120.0, 100.0), (90.0, 140.0), (125.0, 110.0))
    ]
    _throughput()._print_medians(repetitions)
    printed = capsys.readouterr().out
    assert "rannc_s2_d1          1.20x of one process; predicted/measured step 1.00\n" in printed
    assert "lightning_1proc      1.00x of one process\n" in printed  # no prediction, no ratio
    # traced: also the step replayed from the measured actions against the traced step
    for results, replayed in zip(repetitions, (90.0, 100.0, 120.0), strict=True):
        results["rannc_s2_d1"].update(traced_step_ms=100.0, replayed_step_ms=replayed)
    _throughput()._print_medians(repetitions)
    printed = capsys.readouterr().out
    assert "predicted/measured step 1.00; replayed from the measured actions/traced step 1.00\n" in printed


def test_a_traced_run_prints_its_comparison_and_the_loop_outside_the_trace(capsys: pytest.CaptureFixture[str]) -> None:
    result = {"samples_per_s": 120.0, "memory": [[2**20, 2**21]], "ms": 130.0, "traced_step_ms": 126.5}
    _throughput()._print_results(
        {
            "lightning_1proc": {"samples_per_s": 100.0, "memory": [[0, 0]]},
            "rannc_s2_d1": {**result, "comparison": "a\nb"},
        }
    )
    lines = capsys.readouterr().out.splitlines()
    assert [line.strip() for line in lines[-3:-1]] == ["a", "b"]
    assert lines[-1].strip().startswith("Lightning's loop between steps: 3.5 ms")


def test_memory_rows_are_read_with_other_output_on_their_line() -> None:
    spec = importlib.util.spec_from_file_location("memory_benchmark", THROUGHPUT.with_name("memory.py"))
    assert spec is not None and spec.loader is not None
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)

    class Finished:
        returncode = 0

        def communicate(self, timeout: float) -> tuple[str, str]:
            return 'RESULT {"rank": 1, "x": 2}RESULT {"rank": 0, "x": 1}warning\n', ""

    assert memory._rows(Finished(), ranks=2, timeout=1) == [{"rank": 0, "x": 1}, {"rank": 1, "x": 2}]
