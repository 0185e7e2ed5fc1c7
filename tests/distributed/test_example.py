"""The README's first command: the GPT example on CPU with 2 processes, at a small size."""

from pathlib import Path

import pytest

from _dist import run_script

pytestmark = pytest.mark.distributed

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gpt.py"


def test_gpt_example_trains_on_two_processes_and_prints_plan_and_throughput() -> None:
    result = run_script(EXAMPLE, "trainer.max_steps=4", "model.layers=2", "data.size=128", timeout=240)
    out = result.stdout
    assert "plan: 2 stage(s) x 1 replica(s), 4 micro-batch(es) of 4, schedule=1f1b" in out
    assert "stage 0 ranks=[0]" in out and "stage 1 ranks=[1]" in out
    assert "final train_loss" in out and "after 4 steps" in out
    assert "throughput" in out
