"""Pipelined training across processes gives the numbers of plain single-process Lightning.

The pipelined runs go through a real script and Lightning's own launcher (one run per world
size, several cases per run, to keep the suite short); the references run in this process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_rannc import PartitionPlan

from _dist import run_script
from cases import load_record, run_case
from models import GPT

pytestmark = pytest.mark.distributed

TWO_PROCESS_CASES = ("gpt", "cnn", "logging")


@pytest.fixture(scope="module")
def two_process_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pipelined2")
    run_script("run_pipelined.py", str(out), "2", ",".join(TWO_PROCESS_CASES), timeout=420)
    return out


@pytest.fixture(scope="module")
def three_process_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pipelined3")
    run_script("run_pipelined.py", str(out), "3", "gpt6", timeout=300)
    return out


_REFERENCES: dict[str, Path] = {}


@pytest.fixture
def reference_dir(tmp_path_factory: pytest.TempPathFactory):
    def get(name: str) -> Path:
        if name not in _REFERENCES:
            _REFERENCES[name] = tmp_path_factory.mktemp(f"reference_{name}")
            run_case(name, _REFERENCES[name], devices=1)
        return _REFERENCES[name]

    return get


def _checkpoint(directory: Path, name: str) -> dict:
    return torch.load(directory / f"{name}.ckpt", weights_only=False)


def _assert_same_training(pipelined: Path, reference: Path, name: str, world_size: int) -> None:
    ours, ref = load_record(pipelined, name, 0), load_record(reference, name, 0)
    assert len(ours["losses"]) == len(ref["losses"]) >= 5
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    ckpt, ref_ckpt = _checkpoint(pipelined, name), _checkpoint(reference, name)
    assert list(ckpt["state_dict"]) == list(ref_ckpt["state_dict"])
    for key, value in ref_ckpt["state_dict"].items():
        torch.testing.assert_close(ckpt["state_dict"][key], value, rtol=1e-5, atol=1e-5, msg=key)
    for rank in range(world_size):  # after fit every rank holds the whole trained module again
        final = load_record(pipelined, name, rank)["final_state"]
        for key, value in ref["final_state"].items():
            torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-5, msg=f"rank {rank}: {key}")


@pytest.mark.parametrize("name", TWO_PROCESS_CASES)
def test_two_stages_match_single_process(two_process_dir: Path, reference_dir, name: str) -> None:
    _assert_same_training(two_process_dir, reference_dir(name), name, world_size=2)


def test_three_uneven_stages_match_single_process(three_process_dir: Path, reference_dir) -> None:
    _assert_same_training(three_process_dir, reference_dir("gpt6"), "gpt6", world_size=3)
    plan = PartitionPlan.from_json(load_record(three_process_dir, "gpt6", 0)["plan"])
    assert plan.num_stages == 3
    assert [s.ranks for s in plan.stages] == [[0], [1], [2]]
    assert len({s.node_end - s.node_start for s in plan.stages}) > 1  # an uneven split of the graph


@pytest.mark.parametrize("name", TWO_PROCESS_CASES)
def test_logged_values_equal_on_every_rank_and_match_reference(two_process_dir: Path, reference_dir, name: str) -> None:
    rank0, rank1 = load_record(two_process_dir, name, 0), load_record(two_process_dir, name, 1)
    assert rank0["metrics"] == rank1["metrics"]
    if name == "logging":  # validated at steps 3 and 6 on the gathered module, between training steps
        assert "val_loss" in rank0["metrics"][3] and "val_loss" not in rank0["metrics"][1]
    ref = load_record(reference_dir(name), name, 0)
    for ours, theirs in zip(rank0["metrics"], ref["metrics"], strict=True):
        assert ours.keys() == theirs.keys()
        for key in theirs:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("name", TWO_PROCESS_CASES)
def test_each_rank_holds_only_its_stage_parameters_while_training(two_process_dir: Path, name: str) -> None:
    plan = PartitionPlan.from_json(load_record(two_process_dir, name, 0)["plan"])
    kept = [set(load_record(two_process_dir, name, rank)["kept_params"]) for rank in range(2)]
    all_params = set(load_record(two_process_dir, name, 0)["final_state"])
    for rank, stage in enumerate(plan.stages):
        assert kept[rank] == set(stage.tensor_names) & all_params
    assert kept[0] | kept[1] >= all_params - {"head.weight"}  # head.weight is tok_emb.weight
    assert kept[0] != kept[1]


def test_tied_embedding_spans_first_and_last_stage(two_process_dir: Path) -> None:
    plan = PartitionPlan.from_json(load_record(two_process_dir, "gpt", 0)["plan"])
    assert "tok_emb.weight" in plan.stages[0].tensor_names
    assert "tok_emb.weight" in plan.stages[-1].tensor_names  # the head uses it too
    final = load_record(two_process_dir, "gpt", 1)["final_state"]
    assert torch.equal(final["tok_emb.weight"], final["head.weight"])


def test_checkpoint_loads_as_a_plain_lightning_checkpoint(two_process_dir: Path) -> None:
    path = two_process_dir / "gpt.ckpt"
    torch.load(path, weights_only=True)  # nothing of lightning_rannc is pickled in it
    model = GPT.load_from_checkpoint(path)
    saved = _checkpoint(two_process_dir, "gpt")["state_dict"]
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
    assert model.head.weight is model.tok_emb.weight


def test_checkpoint_optimizer_and_scheduler_state_match_single_process(two_process_dir: Path, reference_dir) -> None:
    ckpt, ref = _checkpoint(two_process_dir, "logging"), _checkpoint(reference_dir("logging"), "logging")
    assert ckpt["lr_schedulers"] == ref["lr_schedulers"]
    ours, theirs = ckpt["optimizer_states"][0], ref["optimizer_states"][0]
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for index, state in theirs["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(ours["state"][index][key], value, rtol=1e-5, atol=1e-6)
