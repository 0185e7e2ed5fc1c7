"""The torch compatibility set (``-m compat``): what torch's pipelining does differently from one
release to the next, checked against plain single-process Lightning.

``.ci/run`` runs the whole suite on the README's torch and this set on every other torch the
package claims (``pyproject.toml``), each in a fresh virtual environment. What it covers:
integer token ids and labels crossing a stage boundary, a weight tied across the first and the
last stage, two stages with 1F1B, interleaved 1F1B, zero bubble and ZB-V (whose turn hands values
between two stages of one rank, validating between training steps, and passing a value on
through a stage untouched), two data-parallel replicas
(with ZeRO-3's prefetched gathers too), a sharded
checkpoint resumed, evaluation through the pipeline, and non-contiguous tensors at both ends
of the pipeline (torch < 2.13 checks every stage's strides).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_rannc import PartitionPlan
from lightning_rannc.capture.export import capture_training_step
from lightning_rannc.capture.graph import StepGraph

from helpers.cases import CASES, load_record, run_case
from helpers.dist import run_script
from helpers.eval_cases import load_evaluation, run_evaluation

pytestmark = [pytest.mark.distributed, pytest.mark.compat]

_SHARDED = {"pipeline_stages": 2, "state_dict_type": "sharded"}
RUNS = [
    {
        "label": "s2_1f1b",
        "case": "gpt_full",
        "strategy": {"pipeline_stages": 2, "schedule": "1f1b", "zero_bubble": False},
    },
    {
        "label": "s2_interleaved",
        "case": "gpt_full",
        "strategy": {"pipeline_stages": 2, "virtual_stages": 2, "schedule": "interleaved_1f1b", "zero_bubble": False},
    },
    # torch's ScheduleInterleavedZeroBubble, which the planner may choose on its own
    {"label": "s2_zero_bubble", "case": "gpt_full", "strategy": {"pipeline_stages": 2, "zero_bubble": True}},
    {"label": "s2_zbv", "case": "logging", "strategy": {"pipeline_stages": 2, "schedule": "zbv"}},
    # ... with stages that pass a value on untouched and begin with a transpose (their input
    # gradients alias the received ones, or are views)
    {"label": "skip_zbv", "case": "skip", "strategy": {"pipeline_stages": 2, "schedule": "zbv", "max_blocks": 4}},
    {"label": "s1d2", "case": "gpt_full", "strategy": {"pipeline_stages": 1}},
    # ZeRO-3's gathers: prefetched broadcasts and reduces left running (async collectives)
    {"label": "s1d2_zero3", "case": "gpt_full", "strategy": {"pipeline_stages": 1, "zero_stage": 3}},
    {"label": "strided", "case": "gpt_strided", "strategy": {"pipeline_stages": 2}},
    {"label": "sharded_half", "case": "gpt_full", "strategy": _SHARDED, "trainer": {"max_steps": 3}},
    {"label": "sharded_resumed", "case": "gpt_full", "strategy": _SHARDED, "resume": "sharded_half"},
]
REPLICAS = {"s1d2": 2, "s1d2_zero3": 2}
EVALUATED = {"label": "strided_eval", "case": "gpt_strided", "strategy": {"pipeline_stages": 2}}

_OUT: dict[str, Path] = {}


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if "pipelined" not in _OUT:
        out = tmp_path_factory.mktemp("compat")
        run_script("run_pipelined.py", str(out), "2", json.dumps(RUNS), timeout=600)
        run_script("evaluate.py", str(out), "2", json.dumps([EVALUATED]), timeout=300)
        _OUT["pipelined"] = out
    return _OUT["pipelined"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """Plain Lightning on one process: the same global batches (``replicas`` x larger)."""

    def get(case: str, replicas: int = 1, **kwargs: object) -> Path:
        key = f"{case}_{replicas}_{sorted(kwargs.items())}"
        if key not in _OUT:
            out = tmp_path_factory.mktemp(f"reference_{case}")
            run_case(case, out, label="ref", batch_scale=replicas, devices=1, **kwargs)
            _OUT[key] = out
        return _OUT[key]

    return get


def _close(ours: object, theirs: object, **tolerance: float) -> None:
    torch.testing.assert_close(torch.as_tensor(ours), torch.as_tensor(theirs), **tolerance)


@pytest.mark.parametrize(
    "label", ["s2_1f1b", "s2_interleaved", "s2_zero_bubble", "s2_zbv", "skip_zbv", "s1d2", "s1d2_zero3", "strided"]
)
def test_losses_logged_values_and_weights_match_one_process(pipelined: Path, reference, label: str) -> None:
    run = next(r for r in RUNS if r["label"] == label)
    ref = load_record(reference(run["case"], REPLICAS.get(label, 1)), "ref", 0)
    records = [load_record(pipelined, label, rank) for rank in (0, 1)]
    assert len(records[0]["losses"]) == len(ref["losses"]) >= 5
    _close(records[0]["losses"], ref["losses"], rtol=1e-5, atol=0)
    for record in records:  # logged values equal on every rank; weights whole again after fit
        assert record["metrics"] == records[0]["metrics"]
        for ours, theirs in zip(record["metrics"], ref["metrics"], strict=True):
            assert ours.keys() == theirs.keys()
            _close(list(ours.values()), list(theirs.values()), rtol=1e-5, atol=1e-6)
        for key, value in ref["final_state"].items():
            _close(record["final_state"][key], value, rtol=1e-5, atol=1e-5)


def test_integer_values_cross_the_cut_and_the_tied_weight_is_on_both_stages(pipelined: Path) -> None:
    plan = PartitionPlan.from_json(load_record(pipelined, "s2_1f1b", 0)["plan"])
    assert "tok_emb.weight" in plan.stages[0].tensor_names and "tok_emb.weight" in plan.stages[1].tensor_names
    make_model, make_data, _ = CASES["gpt_full"]
    batch = next(iter(DataLoader(make_data(8).train, batch_size=8)))
    micro = {key: value[: 8 // plan.num_microbatches] for key, value in batch.items()}
    graph = StepGraph.from_captured(capture_training_step(make_model(), micro))
    assert graph.fingerprint() == plan.graph_fingerprint  # the pipelined run cut this graph
    crossing = [node.meta["val"] for node in graph.stage_inputs(plan.stages[1].node_start)]
    assert any(not value.is_floating_point() for value in crossing)  # the labels, at least


def test_a_sharded_checkpoint_resumes_like_one_process(pipelined: Path, reference) -> None:
    shards = sorted((pipelined / "sharded_half.ckpt").glob("*.distcp"))
    assert len(shards) == 2  # each rank wrote its own stage, nothing was gathered
    half = reference("gpt_full", max_steps=3)
    resumed = load_record(reference("gpt_full", ckpt_path=half / "ref.ckpt"), "ref", 0)
    ours = load_record(pipelined, "sharded_resumed", 0)
    assert len(ours["losses"]) == len(resumed["losses"]) == 6  # 3 more steps of 2 accumulated batches
    _close(ours["losses"], resumed["losses"], rtol=1e-5, atol=0)


def test_evaluation_through_the_pipeline_matches_one_process(pipelined: Path, tmp_path: Path) -> None:
    run_evaluation("gpt_strided", tmp_path, "ref", weights=pipelined / "strided_eval_weights.pt", devices=1)
    ref = load_evaluation(tmp_path, "ref", 0)
    for rank in (0, 1):
        ours = load_evaluation(pipelined, "strided_eval", rank)
        assert ours["pipelined_steps"] == ["predict_step", "test_step", "validation_step"]
        for kind in ("validated", "tested"):
            assert ours[kind][0].keys() == ref[kind][0].keys()
            _close(list(ours[kind][0].values()), list(ref[kind][0].values()), rtol=1e-5, atol=1e-6)
        for key in ("predictions", "per_sample"):  # predictions: a view of the logits
            _close(ours[key], ref[key], rtol=1e-5, atol=1e-6)
