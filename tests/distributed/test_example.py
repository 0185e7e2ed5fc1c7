"""The README's first command: the GPT example on CPU with 2 processes, at a small size."""

from pathlib import Path

import pytest

from helpers.dist import run_script

pytestmark = pytest.mark.distributed

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gpt.py"


def test_gpt_example_trains_on_two_processes_and_prints_plan_and_throughput() -> None:
    result = run_script(EXAMPLE, "trainer.max_steps=4", "model.layers=2", "data.size=128", timeout=240)
    out = result.stdout
    assert "plan: 2 stage(s) x 1 replica(s), 4 micro-batch(es) of 4, schedule=1f1b" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert [row[:2] for row in rows[:2]] == [["0", "0"], ["1", "1"]]  # stage, ranks columns of the table
    assert "stage  ranks  modules" in out and "total MiB" in out
    assert "final train_loss" in out and "after 4 steps" in out
    assert "throughput" in out


@pytest.mark.parametrize(
    ("script", "plan"),
    [
        ("bert.py", "(the best of 2 feasible layouts"),  # its config lets the planner choose
        ("resnet.py", "plan: 2 stage(s) x 1 replica(s), 4 micro-batch(es) of 4"),
    ],
)
def test_bert_and_resnet_examples_train_and_print_their_plan(script: str, plan: str) -> None:
    small = ["model.layers=2"] if script == "bert.py" else ["model.depths=[1,1]"]
    devices = ["--accelerator", "cpu", "--devices", "2"]  # the spelling of trainer.accelerator/devices
    result = run_script(EXAMPLE.parent / script, "trainer.max_steps=3", "data.size=128", *small, *devices, timeout=240)
    assert plan in result.stdout and "plan: " in result.stdout
    assert "after 3 steps" in result.stdout and "throughput" in result.stdout
    loss = float(result.stdout.split("final train_loss ")[1].split()[0])
    assert 0 < loss < 10


def test_hf_finetune_example_fine_tunes_a_meta_built_transformers_model_with_a_checkpoint_and_a_resume(
    tmp_path: Path,
) -> None:
    pretrained, checkpoints = tmp_path / "gpt2", tmp_path / "checkpoints"
    options = [f"model.pretrained={pretrained}", f"checkpoint_dir={checkpoints}", "trainer.max_steps=4"]
    result = run_script(EXAMPLE.parent / "hf_finetune.py", *options, "trainer.val_check_interval=2", timeout=300)
    out = result.stdout
    assert (pretrained / "model.safetensors.index.json").is_file()  # made by the example: sharded safetensors
    assert (checkpoints / "last.ckpt").is_file()
    assert "after 2 steps; checkpoint" in out and "after 4 steps" in out
    assert "plan: 2 stage(s) x 1 replica(s)" in out
    assert 0 < float(out.split("val_loss ")[1].split()[0]) < 10


CLI = EXAMPLE.parent / "gpt_cli.py"
CONFIGS = EXAMPLE.parents[1] / "configs"


@pytest.mark.parametrize(
    ("config", "layout"),
    [("gpt_cli.yaml", "2 stage(s) x 1 replica(s)"), ("gpt_cli_short.yaml", "stage(s) x")],
)
def test_lightning_cli_yaml_runs_the_example_with_the_strategy_it_names(config: str, layout: str) -> None:
    """``class_path: lightning_rannc.RaNNCStrategy`` with ``init_args`` (type-checked by
    LightningCLI against the strategy's signature), and the short ``strategy: rannc``."""
    result = run_script(CLI, "fit", "--config", str(CONFIGS / config), "--trainer.max_steps=3", timeout=240)
    assert "after 3 steps; layout" in result.stdout and layout in result.stdout.split("after 3 steps; layout")[1]
    if config == "gpt_cli.yaml":
        assert "micro-batch(es) of 4, schedule=1f1b" in result.stdout  # the init_args arrived


def test_lightning_cli_names_a_wrong_strategy_argument() -> None:
    result = run_script(
        CLI, "fit", "--config", str(CONFIGS / "gpt_cli.yaml"), "--trainer.strategy.init_args.micro_batches=many",
        timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode != 0 and "micro_batches='many'): micro_batches must be a positive" in result.stdout


HYDRA = EXAMPLE.parent / "hydra_app.py"


def test_hydra_config_runs_the_example_with_its_overrides(tmp_path: Path) -> None:
    """``configs/hydra/gpt.yaml``: every object from its ``_target_``; a command-line override
    reaches the strategy on every rank (Lightning starts rank 1 with the same overrides)."""
    run_dir = f"hydra.run.dir={tmp_path}"
    small = ["trainer.max_steps=3", "model.layers=2", "data.size=128", run_dir]
    result = run_script(HYDRA, *small, "strategy.micro_batches=2", timeout=240)
    assert "after 3 steps" in result.stdout
    assert "plan: 2 stage(s) x 1 replica(s), 2 micro-batch(es) of 8, schedule=1f1b" in result.stdout
    assert (tmp_path / ".hydra" / "overrides.yaml").is_file()


@pytest.mark.parametrize(
    ("config", "small", "plan"),
    [
        ("bert", "model.layers=2", "(the best of 2 feasible layouts"),
        ("resnet", "model.depths=[1,1]", "plan: 2 stage(s) x 1 replica(s), 4 micro-batch(es) of 4"),
    ],
)
def test_hydra_configs_of_the_other_examples_run(tmp_path: Path, config: str, small: str, plan: str) -> None:
    args = ["--config-name", config, "trainer.max_steps=3", "data.dataset.size=128", small, f"hydra.run.dir={tmp_path}"]
    result = run_script(HYDRA, *args, timeout=240)
    assert "after 3 steps" in result.stdout and plan in result.stdout


def test_hydra_names_a_wrong_strategy_value(tmp_path: Path) -> None:
    result = run_script(HYDRA, "strategy.micro_batches=many", f"hydra.run.dir={tmp_path}", timeout=120, check=False)
    assert result.returncode != 0 and "micro_batches='many'): micro_batches must be a positive" in result.stdout
