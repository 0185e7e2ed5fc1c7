"""``python -m lightning_rannc plan|show`` on a model built on the meta device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_rannc.__main__ import main
from lightning_rannc.dry_run import plan_module
from lightning_rannc.plan.plan import PartitionPlan
from lightning_rannc.plan.search import SearchSettings

from gpt import GPT, make_dataloader
from helpers.devices import test_device

ROOT = Path(__file__).resolve().parents[2]
TARGET = f"{ROOT / 'benchmarks' / 'models.py'}:GPTLM"
SMALL = json.dumps({"layers": 4, "hidden": 256, "heads": 4, "seq_len": 128, "vocab": 1000, "batch_size": 4})


def test_plan_prints_a_table_and_writes_a_plan_that_show_prints_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "plan.json"
    args = ["plan", TARGET, "--init-args", SMALL, "--devices", "4", "--nodes", "2", "--device", "a100"]
    assert main([*args, "--batch-size", "64", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    plan = PartitionPlan.load(output)
    assert plan.world_size == 4 and plan.microbatch_size * plan.num_microbatches * plan.num_replicas == 64
    assert f"{plan.pipeline_stages} stage(s) x {plan.num_replicas} replica(s)" in printed
    assert "predicted step" in printed and ("total GiB" in printed or "total MiB" in printed)
    assert all(s.memory["total"] <= 0.9 * 85_198_045_184 for s in plan.stages)
    assert main(["show", str(output)]) == 0
    shown = capsys.readouterr().out
    assert shown.splitlines()[:-1] == printed.splitlines()[: len(shown.splitlines()) - 1]


def test_forced_layout_and_a_memory_limit_that_cannot_fit(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["plan", TARGET, "--init-args", SMALL, "--devices", "2", "--batch-size", "8"]
    assert main([*base, "--stages", "2", "--micro-batches", "4"]) == 0
    assert "2 stage(s) x 1 replica(s), 4 micro-batch(es) of 2" in capsys.readouterr().out
    assert main([*base, "--device-memory", "10MB"]) == 2
    error = capsys.readouterr().err
    assert "does not fit on 2 device(s)" in error and "GiB each" in error


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_the_precision_the_trainer_runs_in_is_planned(tmp_path: Path, precision: str) -> None:
    """Half-precision activations (mixed), and parameters too (true): each stage needs less."""
    base = ["plan", TARGET, "--init-args", SMALL, "--devices", "2", "--batch-size", "64", "--stages", "2"]
    plans = {}
    for name in ("32-true", precision):
        output = tmp_path / f"{name}.json"
        assert main([*base, "--micro-batches", "2", "--precision", name, "--output", str(output)]) == 0
        plans[name] = PartitionPlan.load(output)
    full, half = plans["32-true"], plans[precision]
    assert sum(s.activation_bytes for s in half.stages) < 0.8 * sum(s.activation_bytes for s in full.stages)
    params = [sum(s.param_bytes for s in p.stages) for p in (full, half)]
    assert params[1] == (params[0] // 2 if precision == "bf16-true" else params[0])


def test_bad_targets_get_clear_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "no_such_file.py:Model", "--devices", "2"]) == 2
    assert "No such file: no_such_file.py" in capsys.readouterr().err
    assert main(["plan", f"{ROOT / 'benchmarks' / 'models.py'}:Nope", "--devices", "2"]) == 2
    assert "has no 'Nope'" in capsys.readouterr().err


def test_module_entry_point_runs() -> None:
    command = [sys.executable, "-m", "lightning_rannc", "--help"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "plan" in done.stdout and "show" in done.stdout


def test_every_planned_technique_can_be_forced_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "plan.json"
    base = ["plan", TARGET, "--init-args", SMALL, "--devices", "4", "--batch-size", "16", "--output", str(output)]
    forced = ["--stages", "2", "--replicas", "2", "--micro-batches", "4", "--zero-stage", "2", "--zero-bubble"]
    assert main([*base, *forced, "--activation-checkpointing", "on"]) == 0
    plan = PartitionPlan.load(output)
    assert (plan.pipeline_stages, plan.num_replicas, plan.num_microbatches) == (2, 2, 4)
    assert plan.zero_stage == 2 and plan.zero_bubble and all(s.checkpoint for s in plan.stages)
    printed = capsys.readouterr().out
    assert "(zero bubble), optimizer state ZeRO-2" in printed
    assert "as zero bubble, ZeRO-2, activation checkpointing: " in printed.split("techniques: ")[1]
    assert main([*base, *forced, "--offload-optimizer", "on"]) == 0
    assert PartitionPlan.load(output).offload_optimizer
    printed = capsys.readouterr().out
    assert "optimizer offloaded to the host" in printed and "optimizer state and step on the host" in printed


def test_a_lower_precision_that_fits_is_named_as_a_remedy(capsys: pytest.CaptureFixture[str]) -> None:
    """16 MB per device holds the step only with half-precision parameters (the search says so)."""
    base = ["plan", TARGET, "--init-args", SMALL, "--devices", "2", "--batch-size", "8", "--device-memory", "16MB"]
    assert main(base) == 2
    error = capsys.readouterr().err
    assert "does not fit on 2 device(s)" in error
    assert "Trainer(precision='bf16-true') (it finds 2 stage(s) x 1 replica(s)" in error
    assert "precision='bf16-mixed'" not in error  # tried, but half-precision activations are not enough
    assert main([*base, "--precision", "bf16-true"]) == 0
    assert "Trainer(precision=" not in capsys.readouterr().err


def test_planning_in_a_true_half_precision_leaves_the_module_as_it_was() -> None:
    module = GPT(layers=2, dim=32, seq_len=16, vocab_size=64)
    before = {name: t.clone() for name, t in module.state_dict().items()}
    batch = next(iter(make_dataloader(4, 16, 64, size=8)))
    settings = SearchSettings(num_devices=2, global_batch_size=4, device=test_device())
    plan = plan_module(module, batch, settings, precision="bf16-true").plan
    assert sum(s.param_bytes for s in plan.stages) < sum(t.numel() * 4 for t in before.values())  # 2 bytes each
    after = module.state_dict()
    assert all(after[name].dtype == t.dtype and torch.equal(after[name], t) for name, t in before.items())
