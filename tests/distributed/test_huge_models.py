"""Models nobody here wrote, built on the meta device, trained, evaluated, checkpointed and resumed
from pretrained weights, each rank holding and reading only its own stages' tensors.

transformers GPT-2, BERT, T5 and Llama, from small configs, start from a ``save_pretrained``
directory made here (GPT-2's sharded into several safetensors files). GPT-2 is built in
``__init__`` under ``trainer.init_module(empty_init=True)``, the others in ``configure_model``;
each loads its weights with ``lightning_rannc.load_pretrained``. The reference is plain
single-process Lightning on transformers' own ``from_pretrained``. Every run has the sanity check
and a validation loader on. The pipelined runs share one 2-process launch, the references one
process (``tests/scripts/hf_run.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers.dist import run_script
from helpers.hf_models import KINDS, save_pretrained

pytestmark = pytest.mark.distributed

DDP_DRIFT = 3e-4
"""Max-relative weight difference plain Lightning DDP shows against one process after 6 Adam
steps on a small GPT: the bound for weights (losses are held to 1e-5)."""


def _runs(folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The 2-process runs and the 1-process runs (references, and a resume on one process)."""
    gpt2 = {"kind": "gpt2", "pretrained": str(folder / "gpt2")}
    two = [
        # validated first by a Trainer that does not fit (its own plan), then trained by another
        {"label": "pp_gpt2", **gpt2, "strategy": {"pipeline_stages": 2}, "validate_first": True},
        *(
            {
                "label": f"pp_{kind}",
                "kind": kind,
                "pretrained": str(folder / kind),
                "build": "configure_model",
                "strategy": {"pipeline_stages": 2},
            }
            for kind in KINDS[1:]
        ),  # fmt: skip
        # two replicas of one stage, each parameter held by one (ZeRO-3); every rank reads every batch
        {
            "label": "zero3_llama",
            "kind": "llama",
            "pretrained": str(folder / "llama"),
            "build": "configure_model",
            "strategy": {"pipeline_stages": 1, "zero_stage": 3},
        },
        {
            "label": "half",
            **gpt2,
            "strategy": {"pipeline_stages": 2},
            "max_steps": 3,
            "save": str(folder / "half.ckpt"),
        },
        {
            "label": "half_sharded",
            **gpt2,
            "strategy": {"pipeline_stages": 2, "state_dict_type": "sharded"},
            "max_steps": 3,
            "save": str(folder / "half_sharded"),
        },  # fmt: skip
        {
            "label": "resumed_sharded",
            **gpt2,
            "strategy": {"pipeline_stages": 2},
            "resume": str(folder / "half_sharded"),
        },
        {
            "label": "evaluated",
            "kind": "gpt2",
            "strategy": {"pipeline_stages": 2},
            "resume": str(folder / "half.ckpt"),
            "evaluate": True,
        },  # fmt: skip
    ]
    one = [
        *(
            {
                "label": f"ref_{kind}",
                "kind": kind,
                "pretrained": str(folder / kind),
                "build": "from_pretrained",
                "validate_first": kind == "gpt2",
            }
            for kind in KINDS
        ),  # fmt: skip
        {
            "label": "ref_evaluated",
            "kind": "gpt2",
            "build": "plain",
            "resume": str(folder / "half.ckpt"),
            "evaluate": True,
        },
        # another world size and layout: 2 stages on 2 processes saved it, 1 stage on 1 process resumes
        {"label": "resumed_full", **gpt2, "strategy": {"pipeline_stages": 1}, "resume": str(folder / "half.ckpt")},
    ]
    for run in [*two, *one]:
        if "strategy" in run:  # the preset's links, not measured ones: the same split on every run
            run["strategy"]["measure_links"] = False
    return two, one


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("huge")
    for kind in KINDS:
        save_pretrained(kind, folder / kind, max_shard_size="20KB" if kind == "gpt2" else None)
    assert len(list((folder / "gpt2").glob("*.safetensors"))) > 2  # sharded, with an index file
    two, one = _runs(folder)
    run_script("hf_run.py", str(folder), "2", json.dumps(two), timeout=600)
    run_script("hf_run.py", str(folder), "1", json.dumps(one), timeout=300)
    return folder


def _record(folder: Path, label: str, rank: int = 0) -> dict[str, Any]:
    return json.loads((folder / f"{label}_rank{rank}.json").read_text())


def _assert_same_training(ours: dict[str, Any], ref: dict[str, Any]) -> None:
    """Per-step losses within 1e-5 relative (``ours`` may be the last steps only, after a resume),
    validation within 1e-5, every weight this rank holds within DDP's drift."""
    expected = ref["losses"][-len(ours["losses"]) :]
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(expected), rtol=1e-5, atol=0)
    assert ours["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5)
    for key, value in ours["held"].items():
        mine, theirs = torch.tensor(value), torch.tensor(ref["held"][key])
        assert float((mine - theirs).abs().max() / theirs.abs().max()) <= DDP_DRIFT, key


def _assert_partitioned(records: list[dict[str, Any]], ref: dict[str, Any]) -> None:
    """Every tensor is held by some rank, and no rank holds them all (after fit too)."""
    held = [set(r["held"]) for r in records]
    assert set().union(*held) == set(ref["held"])
    assert all(h < set(ref["held"]) for h in held)


@pytest.mark.parametrize("kind", [pytest.param("gpt2", marks=pytest.mark.compat), *KINDS[1:]])
def test_a_transformers_model_built_on_the_meta_device_trains_from_pretrained_weights_as_one_process(
    runs: Path, kind: str
) -> None:
    ref = _record(runs, f"ref_{kind}")
    records = [_record(runs, f"pp_{kind}", rank) for rank in range(2)]
    for record in records:
        assert record["stages"] == 2
        _assert_same_training(record, ref)
        # each rank read from the pretrained files only the tensors of its own stages (under the bare names)
        assert {f"model.{key}" for key in record["read"]} <= set(record["held"]) | _tied(ref, record)
    _assert_partitioned(records, ref)
    assert len(set(ref["losses"])) == 6  # the reference trained: every step's loss differs


def test_a_transformers_model_on_the_meta_device_under_zero_3_holds_each_parameter_on_one_replica(
    runs: Path,
) -> None:
    ref = _record(runs, "ref_llama")
    records = [_record(runs, "zero3_llama", rank) for rank in range(2)]
    for record in records:
        assert record["stages"] == 1
        _assert_same_training(record, ref)  # both replicas read the same batches: one process's numbers
        assert {f"model.{key}" for key in record["read"]} <= set(record["held"])
    _assert_partitioned(records, ref)


def test_a_meta_device_module_validated_before_fit_is_planned_again_from_its_pretrained_weights(runs: Path) -> None:
    ref = _record(runs, "ref_gpt2")
    for rank in range(2):
        record = _record(runs, "pp_gpt2", rank)
        assert record["validated_first"][0]["val_loss"] == pytest.approx(
            ref["validated_first"][0]["val_loss"], rel=1e-5
        )
        _assert_same_training(record, ref)  # the fit after it started from the pretrained weights again


def test_a_new_fit_of_a_partitioned_meta_device_module_is_refused_with_what_to_do(tmp_path: Path) -> None:
    pretrained = save_pretrained("gpt2", tmp_path / "gpt2")
    run = {"label": "again", "kind": "gpt2", "pretrained": str(pretrained), "max_steps": 3, "fit_again": True}
    run["strategy"] = {"pipeline_stages": 2, "measure_links": False}
    result = run_script("hf_run.py", str(tmp_path), "2", json.dumps([run]), timeout=300, check=False)
    assert result.returncode != 0
    assert "partitioned by an earlier `fit`" in result.stdout and "pass it as `ckpt_path`" in result.stdout


def _tied(ref: dict[str, Any], record: dict[str, Any]) -> set[str]:
    """Names of tensors saved under another name of a tied pair (GPT-2's head is its embedding)."""
    return {"model.transformer.wte.weight"} if "model.lm_head.weight" in record["held"] else set()


def test_a_meta_device_module_resumes_as_the_uninterrupted_run_at_the_same_and_another_world_size(runs: Path) -> None:
    uninterrupted = _record(runs, "pp_gpt2")
    # each run plans afresh (measured links): the uninterrupted weights from whichever rank held them
    uninterrupted["held"] = {**_record(runs, "pp_gpt2", 1)["held"], **uninterrupted["held"]}
    sharded = [_record(runs, "resumed_sharded", rank) for rank in range(2)]
    full = _record(runs, "resumed_full")
    for record in [*sharded, full]:
        assert len(record["losses"]) == 3  # steps 4-6, after the checkpoint of step 3
        _assert_same_training(record, uninterrupted)
    _assert_partitioned(sharded, _record(runs, "ref_gpt2"))
    for record in sharded:
        # from the sharded checkpoint each rank read only its own tensors and their optimizer state
        model_keys = {key for key in record["read"] if not key.startswith("optimizer_")}
        assert model_keys <= set(record["held"])
        assert len([key for key in record["read"] if key.startswith("optimizer_0.state.")]) <= len(record["held"])
    assert full["stages"] == 1 and set(full["held"]) == set(_record(runs, "ref_gpt2")["held"])


def test_a_fresh_trainer_validates_tests_and_predicts_a_meta_device_module_through_its_pipeline(runs: Path) -> None:
    ref = _record(runs, "ref_evaluated")
    records = [_record(runs, "evaluated", rank) for rank in range(2)]
    for record in records:
        assert record["stages"] == 2
        assert record["validate"][0]["val_loss"] == pytest.approx(ref["validate"][0]["val_loss"], rel=1e-5)
        assert record["test"][0]["test_loss"] == pytest.approx(ref["test"][0]["test_loss"], rel=1e-5)
        torch.testing.assert_close(torch.tensor(record["predict"]), torch.tensor(ref["predict"]), rtol=1e-5, atol=0)
        assert set(record["read"]) <= set(record["held"])
    _assert_partitioned(records, ref)
