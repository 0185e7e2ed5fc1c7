"""The README's benchmark commands run (at a small size) and print what the README quotes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers.dist import run_script

pytestmark = pytest.mark.distributed

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_throughput_prints_samples_per_second_ratios_and_predictions() -> None:
    args = ["--repeat", "1", "--steps", "2", "--warmup", "1", "--layers", "1", "--dim", "32", "--only", "rannc_s1_d2"]
    out = run_script(BENCHMARKS / "throughput.py", *args, timeout=300).stdout
    assert re.search(r"lightning_1proc\s+[\d.]+ samples/s\s+1\.00x", out)
    assert re.search(r"rannc_s1_d2\s+[\d.]+ samples/s\s+[\d.]+x", out)
    assert "ms measured" in out and "ms predicted" in out


def test_memory_shows_a_stage_holding_less_than_the_whole_model() -> None:
    out = run_script(BENCHMARKS / "memory.py", "--stages", "1", "2", "--dim", "64", "--layers", "2", timeout=300).stdout
    held = [float(x) for x in re.findall(r"holds\s+([\d.]+) MiB", out)]
    assert len(held) == 3  # 1 stage: rank 0; 2 stages: ranks 0 and 1
    assert max(held[1:]) <= held[0] and min(held[1:]) < held[0] and sum(held[1:]) > held[0]  # the tied embedding twice


def test_plan_scale_plans_a_gpt3_shape_on_1024_devices() -> None:
    out = run_script(BENCHMARKS / "plan_scale.py", "--only", "gpt-175b", "--layers", "12", timeout=300).stdout
    assert "1024 device(s):" in out and "within the" in out and "predicted step" in out


def test_planner_baselines_compare_partitioners_with_ours() -> None:
    out = run_script(BENCHMARKS / "planner_baselines.py", "--only", "gpt", "--devices", "4", timeout=300).stdout
    assert "even-layers" in out and "by-params" in out and "lower bound" in out
    assert re.search(r"\s4\s+\d+x\d+x\d+\s+[\d,]+", out)  # a plan found for 4 devices


def test_pipeline_bound_prints_bounds_with_and_without_the_bubble() -> None:
    args = ["--batch-size", "8", "--micro-batches", "2,4", "--layers", "1", "--dim", "32", "--repeats", "2"]
    out = run_script(BENCHMARKS / "pipeline_bound.py", *args, timeout=300).stdout
    bounds = re.findall(r"M= ?(\d+) .* bound ([\d.]+)x with the 1F1B bubble, ([\d.]+)x without", out)
    assert [int(m) for m, _, _ in bounds] == [2, 4]
    for micro_batches, with_bubble, without in bounds:  # 2 stages fill and drain over 1 more slot
        ratio = (int(micro_batches) + 1) / int(micro_batches)
        assert float(without) == pytest.approx(float(with_bubble) * ratio, abs=0.02) and float(without) > 0
