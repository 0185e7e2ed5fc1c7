"""Pipelined training across processes gives the numbers of plain single-process Lightning.

The pipelined runs go through a real script and Lightning's own launcher (one script per world
size, several runs per script, to keep the suite short); the references run in this process
with the same global batches. Layouts are (S ranks per pipeline, D replicas).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_rannc import PartitionPlan, RaNNCStrategy
from lightning_rannc.__main__ import main as main_cli
from lightning_rannc.report.measured import read_measured_step

from helpers.cases import load_record, run_case
from helpers.dist import SCRIPTS, run_script, script_env
from helpers.models import GPT

pytestmark = pytest.mark.distributed


def _run(label: str, case: str, **strategy: object) -> dict:
    return {"label": label, "case": case, "strategy": strategy}


RUNS: dict[int | str, list[dict]] = {
    2: [
        _run("gpt", "gpt", pipeline_stages=2),
        _run("cnn", "cnn", pipeline_stages=2),
        _run("logging", "logging", pipeline_stages=2),
        _run("s1d2_gpipe", "gpt_full", pipeline_stages=1, schedule="gpipe", zero_stage=1),
        _run(
            "s1d2_1f1b",
            "gpt_full",
            pipeline_stages=1,
            schedule="1f1b",
            zero_stage=1,
            trace="s1d2.trace.json",
            trace_steps=4,
        ),
        # every replica keeps the whole optimizer state (as DDP), no broadcast after the step
        _run("s1d2_zero0", "gpt_full", pipeline_stages=1, zero_stage=0),
        # gradients reduced to the replica that updates them, the other shares freed
        _run("s1d2_zero2", "gpt_full", pipeline_stages=1, zero_stage=2),
        # each parameter held by the replica that updates it, gathered where it is used
        _run("s1d2_zero3", "gpt_full", pipeline_stages=1, zero_stage=3),
        # ... also in the pipelined validation between training steps
        _run("logging_zero3", "logging", pipeline_stages=1, zero_stage=3),
        # the optimizer state and step in host memory (here the device is the host: copies)
        _run("s1d2_offload", "gpt_full", pipeline_stages=1, zero_stage=1, offload_optimizer=True),
        _run("s2d1_offload", "gpt_full", pipeline_stages=2, offload_optimizer=True),
        # data parallelism under a memory limit its activations exceed: the planner recomputes
        # the first layers, each a checkpoint of its own (the whole stage as one would save nothing)
        _run(
            "s1d2_layers_recomputed",
            "gpt_full",
            pipeline_stages=1,
            micro_batches=1,
            zero_stage=1,
            offload_optimizer=False,
            memory_limit=1_800_000,
        ),
        _run("s2d1_gpipe", "gpt_full", pipeline_stages=2, schedule="gpipe"),
        _run("s2d1_1f1b", "gpt_full", pipeline_stages=2, schedule="1f1b", zero_bubble=False),
        _run(
            "s2d1_interleaved",
            "gpt_full",
            pipeline_stages=2,
            virtual_stages=2,
            schedule="interleaved_1f1b",
            zero_bubble=False,
        ),
        # backward split into input and weight gradients (torch's ScheduleInterleavedZeroBubble)
        _run("s2d1_zero_bubble", "gpt_full", pipeline_stages=2, zero_bubble=True),
        _run("s2d1_interleaved_zb", "gpt_full", pipeline_stages=2, virtual_stages=2, zero_bubble=True),
        # ZB-V: rank 0 runs stages 0 and 3, rank 1 stages 1 and 2 (handed over on the rank); the tied
        # embedding's two copies are on one rank; validation between training steps, forwards only
        _run("s2d1_zbv", "logging", pipeline_stages=2, schedule="zbv"),
        # Four stages, the middle two passing a value on untouched and beginning with a transpose:
        # input gradients that are the received ones (kept until sent or handed over) and views
        # (sent contiguous); one block a stage, so the cuts fall between layers whatever the timings
        _run("skip_zbv", "skip", pipeline_stages=2, schedule="zbv", max_blocks=4),
        _run("skip_interleaved_zb", "skip", pipeline_stages=2, virtual_stages=2, zero_bubble=True, max_blocks=4),
        _run("s2d1_checkpointed", "gpt_full", pipeline_stages=2, activation_checkpointing=True),
        # the weight pass recomputes each region once for all its parameter groups (GraphExecGroup)
        _run("s2d1_zb_checkpointed", "gpt_full", pipeline_stages=2, zero_bubble=True, activation_checkpointing=True),
        _run("varlen", "gpt_varlen", pipeline_stages=2),
        # The layout and micro-batch count chosen by the planner, from a batch sampled at setup.
        _run("auto", "gpt_full", pipeline_stages="auto", micro_batches="auto"),
        # configure_optimizers reads estimated_stepping_batches: the loaders are sharded during
        # setup, so the layout must be chosen before the optimizers are made
        _run("auto_stepping", "gpt_stepping", pipeline_stages="auto"),
        _run("cnn_bn", "cnn_bn", pipeline_stages=2, micro_batches=4),
        _run("reducing_s2d1", "reducing", pipeline_stages=2, micro_batches=4),
    ],
    # Dropout: compared among themselves (the streams are not a single process's).
    "2-dropout": [
        _run("drop_gpipe", "gpt_dropout", pipeline_stages=2, micro_batches=4, schedule="gpipe"),
        _run("drop_1f1b", "gpt_dropout", pipeline_stages=2, micro_batches=4, schedule="1f1b", zero_bubble=False),
        _run("drop_gpipe_again", "gpt_dropout", pipeline_stages=2, micro_batches=4, schedule="gpipe"),
        _run(
            "drop_interleaved", "gpt_dropout", pipeline_stages=2, micro_batches=4, virtual_stages=2, zero_bubble=False
        ),
        _run("drop_checkpointed", "gpt_dropout", pipeline_stages=2, micro_batches=4, activation_checkpointing=True),
        _run(
            "drop_zb_checkpointed",
            "gpt_dropout",
            pipeline_stages=2,
            micro_batches=4,
            activation_checkpointing=True,
            zero_bubble=True,
        ),
        _run(
            "drop_verified",
            "gpt_dropout",
            pipeline_stages=2,
            micro_batches=4,
            schedule="gpipe",
            verify=True,
            verify_tolerance=1e-5,
        ),
        _run("bf16_mixed", "gpt_bf16_mixed", pipeline_stages=2),
        _run("bf16_true", "gpt_bf16_true", pipeline_stages=2),
        _run("fp16", "gpt_fp16", pipeline_stages=2),
        _run("fp16_fused", "gpt_fp16_fused", pipeline_stages=2),
        _run("meta", "gpt_meta", pipeline_stages=2),
        _run("meta_zero3", "gpt_meta", pipeline_stages=1, zero_stage=3),
    ],
    3: [_run("gpt6", "gpt6", pipeline_stages=3)],
    4: [
        _run("s2d2_gpipe", "gpt_full", pipeline_stages=2, schedule="gpipe"),
        # ZeRO-1 forced: its replicas exchange gradients through DDP (the planner may pick ZeRO-0 or 2)
        _run("s2d2_1f1b", "gpt_full", pipeline_stages=2, schedule="1f1b", zero_bubble=False, zero_stage=1),
        _run("s2d2_zero0", "gpt_full", pipeline_stages=2, zero_stage=0),
        # the tied embedding's copies on the first and last stage have owners of their own
        _run("s2d2_zero2", "gpt_full", pipeline_stages=2, zero_stage=2, verify=True, verify_tolerance=1e-5),
        # ZeRO-3 beside the tied embedding (kept whole, as ZeRO-2), with checkpointed stages recomputing
        # their gathers in backward, 4 micro-batches, and the first step compared unpartitioned
        _run(
            "s2d2_zero3",
            "gpt_full",
            pipeline_stages=2,
            zero_stage=3,
            micro_batches=4,
            activation_checkpointing=True,
            verify=True,
            verify_tolerance=1e-5,
        ),
        _run("s4d1_gpipe", "gpt_full", pipeline_stages=4, schedule="gpipe"),
        _run("s4d1_1f1b", "gpt_full", pipeline_stages=4, schedule="1f1b", zero_bubble=False),
        # ZB-V over two replicas with ZeRO-2 (a stage's two replicas are ranks 0 and 2, or 1 and 3)
        _run("s2d2_zbv_zero2", "gpt_full", pipeline_stages=2, schedule="zbv", zero_stage=2),
        _run("cnn_bn_s2d2", "cnn_bn", pipeline_stages=2, micro_batches=4),
        # the first step also run unpartitioned on each replica and compared (it raises if not equal)
        _run("s2d2_verified", "gpt_full", pipeline_stages=2, verify=True, verify_tolerance=1e-5),
        _run("reducing_s2d2", "reducing", pipeline_stages=2, micro_batches=4),
    ],
}
LAYOUTS = [
    (world, run)
    for world, runs in RUNS.items()
    if isinstance(world, int)
    for run in runs
    if run["case"] not in ("cnn_bn", "reducing")
]


def _replicas(directory: Path, run: dict) -> int:
    """The replicas the run trained with (its reference reads that many batches per step)."""
    return PartitionPlan.from_json(load_record(directory, run["label"], 0)["plan"]).num_replicas


_PIPELINED: dict[int | str, Path] = {}
_REFERENCES: dict[tuple[str, int], Path] = {}


@pytest.fixture
def pipelined(tmp_path_factory: pytest.TempPathFactory):
    def get(world: int | str) -> Path:
        if world not in _PIPELINED:
            out = tmp_path_factory.mktemp(f"pipelined{world}")
            devices = str(world).split("-")[0]
            run_script("run_pipelined.py", str(out), devices, json.dumps(RUNS[world]), timeout=600)
            _PIPELINED[world] = out
        return _PIPELINED[world]

    return get


@pytest.fixture
def reference(tmp_path_factory: pytest.TempPathFactory):
    def get(case: str, replicas: int) -> Path:
        if (case, replicas) not in _REFERENCES:
            out = tmp_path_factory.mktemp(f"reference_{case}_{replicas}")
            run_case(case, out, batch_scale=replicas, devices=1)
            _REFERENCES[case, replicas] = out
        return _REFERENCES[case, replicas]

    return get


def _checkpoint(directory: Path, label: str) -> dict:
    return torch.load(directory / f"{label}.ckpt", weights_only=False)


def _ids(layout: tuple[int, dict]) -> str:
    return f"{layout[0]}proc-{layout[1]['label']}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=_ids)
def test_losses_and_weights_match_single_process(pipelined, reference, layout: tuple[int, dict]) -> None:
    world, run = layout
    ours_dir = pipelined(world)
    ref_dir = reference(run["case"], _replicas(ours_dir, run))
    ours, ref = load_record(ours_dir, run["label"], 0), load_record(ref_dir, run["case"], 0)
    assert len(ours["losses"]) == len(ref["losses"]) >= 5
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    ckpt, ref_ckpt = _checkpoint(ours_dir, run["label"]), _checkpoint(ref_dir, run["case"])
    assert list(ckpt["state_dict"]) == list(ref_ckpt["state_dict"])
    for key, value in ref_ckpt["state_dict"].items():
        torch.testing.assert_close(ckpt["state_dict"][key], value, rtol=1e-5, atol=1e-5, msg=key)
    for rank in range(world):  # after fit every rank holds the whole trained module again
        final = load_record(ours_dir, run["label"], rank)["final_state"]
        for key, value in ref["final_state"].items():
            torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-5, msg=f"rank {rank}: {key}")


@pytest.mark.parametrize("layout", LAYOUTS, ids=_ids)
def test_logged_values_equal_on_every_rank_and_match_reference(pipelined, reference, layout) -> None:
    world, run = layout
    records = [load_record(pipelined(world), run["label"], rank) for rank in range(world)]
    replicas = _replicas(pipelined(world), run)
    ref = load_record(reference(run["case"], replicas), run["case"], 0)
    for step, theirs in enumerate(ref["metrics"]):
        ours = [r["metrics"][step] for r in records]
        assert all(o.keys() == theirs.keys() for o in ours)
        for key in theirs:
            if key.startswith("val_"):
                # Each replica validates its share of the batches, as with DDP (no sync_dist):
                # their mean is one process's value.
                value = sum(o[key] for o in ours) / world
            else:
                assert all(o[key] == ours[0][key] for o in ours), key
                value = ours[0][key]
            assert value == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize(("world", "label"), [(2, "reducing_s2d1"), (4, "reducing_s2d2")])
def test_logged_sums_maxima_and_minima_reduce_over_replicas_as_ddp_with_sync_dist(
    pipelined, reference, world: int, label: str
) -> None:
    """Each replica combines its micro-batches by the value's reduction; `sync_dist` then reduces
    the replicas' values with `reduce_fx`, so every rank logs the whole global batch's value."""
    records = [load_record(pipelined(world), label, rank) for rank in range(world)]
    assert all(r["metrics"] == records[0]["metrics"] for r in records)
    replicas = _replicas(pipelined(world), {"label": label})
    ref = load_record(reference("reducing", replicas), "reducing", 0)
    assert len(records[0]["metrics"]) == len(ref["metrics"]) == 6
    for ours, theirs in zip(records[0]["metrics"], ref["metrics"], strict=True):
        assert ours.keys() == theirs.keys() >= {"worst_step", "best_step", "total_step", "mean_max_step", "wrong_step"}
        for key in theirs:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key
    if replicas == 1:  # a summed loss is each replica's own sum, as with DDP: one replica's is the batch's
        torch.testing.assert_close(torch.tensor(records[0]["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("layout", [x for x in LAYOUTS if x[1]["case"] in ("gpt_full", "logging")], ids=_ids)
def test_checkpoint_optimizer_and_scheduler_state_match_single_process(pipelined, reference, layout) -> None:
    world, run = layout
    ckpt = _checkpoint(pipelined(world), run["label"])
    ref = _checkpoint(reference(run["case"], _replicas(pipelined(world), run)), run["case"])
    assert ckpt["lr_schedulers"] == ref["lr_schedulers"]
    ours, theirs = ckpt["optimizer_states"][0], ref["optimizer_states"][0]
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for index, state in theirs["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(ours["state"][index][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("label", ["logging", "logging_zero3"])
def test_logging_case_validated_between_training_steps(pipelined, label: str) -> None:
    metrics = load_record(pipelined(2), label, 0)["metrics"]
    assert "val_loss" in metrics[3] and "val_loss" not in metrics[1]


@pytest.mark.parametrize("layout", LAYOUTS, ids=_ids)
def test_each_rank_holds_only_its_stages_parameters_while_training(pipelined, layout) -> None:
    world, run = layout
    plan = PartitionPlan.from_json(load_record(pipelined(world), run["label"], 0)["plan"])
    all_params = set(load_record(pipelined(world), run["label"], 0)["final_state"])
    kept = {r: set(load_record(pipelined(world), run["label"], r)["kept_params"]) for r in range(world)}
    for rank in range(world):
        expected = {n for s in plan.stages_of_rank(rank) for n in s.tensor_names} & all_params
        if plan.zero_stage == 3:  # each parameter on one replica only
            assert kept[rank] < expected
        else:
            assert kept[rank] == expected
    assert set().union(*kept.values()) >= all_params - {"head.weight"}  # head.weight is tok_emb.weight


@pytest.mark.parametrize("label", ["s1d2_gpipe", "s1d2_1f1b", "s1d2_zero2"])
def test_replicas_each_hold_about_half_of_the_optimizer_state(pipelined, reference, label: str) -> None:
    ours = [load_record(pipelined(2), label, rank)["optimizer_state_numel"] for rank in range(2)]
    full = load_record(reference("gpt_full", 2), "gpt_full", 0)["optimizer_state_numel"]
    assert sum(ours) == full
    assert all(0.4 * full < part < 0.6 * full for part in ours)


def test_with_zero_stage_0_every_replica_holds_the_whole_optimizer_state(pipelined, reference) -> None:
    ours = [load_record(pipelined(2), "s1d2_zero0", rank)["optimizer_state_numel"] for rank in range(2)]
    full = load_record(reference("gpt_full", 2), "gpt_full", 0)["optimizer_state_numel"]
    assert ours == [full, full]
    assert PartitionPlan.from_json(load_record(pipelined(2), "s1d2_zero0", 0)["plan"]).zero_stage == 0
    assert PartitionPlan.from_json(load_record(pipelined(2), "s1d2_1f1b", 0)["plan"]).zero_stage == 1


def test_with_zero_stage_2_each_replica_holds_only_the_gradients_it_updates(pipelined, reference) -> None:
    full = load_record(reference("gpt_full", 2), "gpt_full", 0)["grad_numel"]
    zero2 = [load_record(pipelined(2), "s1d2_zero2", rank)["grad_numel"] for rank in range(2)]
    zero1 = [load_record(pipelined(2), "s1d2_1f1b", rank)["grad_numel"] for rank in range(2)]
    assert sum(zero2) == full and all(0.4 * full < part < 0.6 * full for part in zero2)
    assert zero1 == [full, full]  # ZeRO-1 keeps every gradient (the norm reads them)
    for world, label in ((2, "s1d2_zero2"), (4, "s2d2_zero2")):
        plan = PartitionPlan.from_json(load_record(pipelined(world), label, 0)["plan"])
        assert plan.zero_stage == 2 and not load_record(pipelined(world), label, 0)["ddp_stages"]


@pytest.mark.parametrize("world,label", [(2, "s1d2_zero3"), (4, "s2d2_zero3")])
def test_with_zero_stage_3_each_replica_holds_only_the_parameters_it_updates(
    pipelined, reference, world: int, label: str
) -> None:
    plan = PartitionPlan.from_json(load_record(pipelined(world), label, 0)["plan"])
    assert plan.zero_stage == 3 and not load_record(pipelined(world), label, 0)["ddp_stages"]
    full = load_record(reference("gpt_full", 2), "gpt_full", 0)
    records = [load_record(pipelined(world), label, rank) for rank in range(world)]
    # The replicas of a stage hold disjoint parameters (the tied embedding aside, on every
    # replica of its stages), the gradients of these only, and their optimizer state.
    for position in range(plan.pipeline_stages):
        replicas = [records[r] for r in range(world) if r % plan.pipeline_stages == position]
        kept = [set(r["kept_params"]) - {"tok_emb.weight"} for r in replicas]
        assert not set.intersection(*kept)
        for record in replicas:
            assert record["grad_numel"] == record["optimizer_state_numel"]
    # The tied embedding's gradient is held once per stage it is on.
    tied = full["final_state"]["tok_emb.weight"].numel() if plan.pipeline_stages > 1 else 0
    assert sum(r["grad_numel"] for r in records) == full["grad_numel"] + tied


def test_an_offloaded_optimizer_steps_on_host_copies_of_its_share(pipelined, reference) -> None:
    full = load_record(reference("gpt_full", 2), "gpt_full", 0)["optimizer_state_numel"]
    shares = [load_record(pipelined(2), "s1d2_offload", rank)["optimizer_state_numel"] for rank in range(2)]
    assert sum(shares) == full  # ZeRO-1's split, on the host
    for label in ("s1d2_offload", "s2d1_offload"):
        record = load_record(pipelined(2), label, 0)
        assert PartitionPlan.from_json(record["plan"]).offload_optimizer
        assert not record["optimizer_holds_module_params"]
    assert load_record(pipelined(2), "s1d2_1f1b", 0)["optimizer_holds_module_params"]


def test_the_planner_recomputes_layers_one_at_a_time_where_data_parallelism_would_not_fit(pipelined) -> None:
    plan = PartitionPlan.from_json(load_record(pipelined(2), "s1d2_layers_recomputed", 0)["plan"])
    (stage,) = plan.stages
    assert (plan.num_replicas, plan.num_microbatches) == (2, 1) and not stage.checkpoint
    assert stage.recompute_end is not None and len(stage.recompute_cuts) >= 3  # the embedding, blocks.0, ...
    assert "blocks.0" in stage.recompute_span and stage.memory["total"] <= 0.9 * 1_800_000


def test_trace_shows_replicas_sharing_the_parameters_each_updated(pipelined) -> None:
    events = json.loads((pipelined(2) / "s1d2.trace.json").read_text())["traceEvents"]
    for rank in (0, 1):
        mine = [e for e in events if e["ph"] == "X" and e["pid"] == rank]
        updates = [e["args"]["step"] for e in mine if e["name"] == "optimizer step"]
        shared = [e for e in mine if e["name"] == "updated parameters shared by replicas"]
        assert updates == [2, 4]  # 4 batches, accumulating 2
        assert [e["args"]["step"] for e in shared] == updates and all(e["dur"] > 0 for e in shared)


def test_layouts_and_schedules_are_the_planned_ones(pipelined) -> None:
    plan = PartitionPlan.from_json(load_record(pipelined(4), "s2d2_1f1b", 0)["plan"])
    assert (plan.pipeline_stages, plan.num_replicas, plan.schedule) == (2, 2, "1f1b")
    assert [s.ranks for s in plan.stages] == [[0, 2], [1, 3]]
    plan = PartitionPlan.from_json(load_record(pipelined(2), "s2d1_interleaved", 0)["plan"])
    assert (plan.num_stages, plan.virtual_stages, plan.schedule) == (4, 2, "interleaved_1f1b")
    for label in ("s2d1_zero_bubble", "s2d1_interleaved_zb", "s2d1_zb_checkpointed"):
        record = load_record(pipelined(2), label, 0)
        plan = PartitionPlan.from_json(record["plan"])
        assert plan.zero_bubble and plan.schedule in ("1f1b", "interleaved_1f1b")
        assert record["schedule_class"] == "ScheduleInterleavedZeroBubble"
        assert all(s.checkpoint for s in plan.stages) == (label == "s2d1_zb_checkpointed")
    assert load_record(pipelined(2), "s2d1_1f1b", 0)["schedule_class"] == "Schedule1F1B"
    record = load_record(pipelined(2), "s2d1_zbv", 0)
    plan = PartitionPlan.from_json(record["plan"])
    assert (plan.schedule, plan.zero_bubble, plan.virtual_stages, record["schedule_class"]) == (
        "zbv",
        True,
        2,
        "ScheduleZBVZeroBubble",
    )
    assert [s.ranks for s in plan.stages] == [[0], [1], [1], [0]]  # a V: the first and last stage on rank 0
    plan = PartitionPlan.from_json(load_record(pipelined(4), "s2d2_zbv_zero2", 0)["plan"])
    assert [s.ranks for s in plan.stages] == [[0, 2], [1, 3], [1, 3], [0, 2]] and plan.zero_stage == 2
    # replicas exchange gradients through DDP during the last backward; one pipeline has none
    assert load_record(pipelined(4), "s2d2_1f1b", 0)["ddp_stages"] == 1
    assert load_record(pipelined(2), "s1d2_1f1b", 1)["ddp_stages"] == 1
    assert load_record(pipelined(2), "s2d1_1f1b", 0)["ddp_stages"] == 0
    plan = PartitionPlan.from_json(load_record(pipelined(3), "gpt6", 0)["plan"])
    assert plan.num_stages == 3 and len({s.node_end - s.node_start for s in plan.stages}) > 1  # uneven


def test_changing_shapes_reuse_the_plan_with_stages_built_per_shape(pipelined) -> None:
    record = load_record(pipelined(2), "varlen", 0)
    # lengths 16, 12, 8 at batch 8, and the 4-sample last batch of each epoch at two lengths
    assert record["batch_shapes_built"] >= 4
    assert len(record["losses"]) == 10


def test_tied_embedding_spans_first_and_last_stage(pipelined) -> None:
    plan = PartitionPlan.from_json(load_record(pipelined(2), "gpt", 0)["plan"])
    assert "tok_emb.weight" in plan.stages[0].tensor_names
    assert "tok_emb.weight" in plan.stages[-1].tensor_names  # the head uses it too
    final = load_record(pipelined(2), "gpt", 1)["final_state"]
    assert torch.equal(final["tok_emb.weight"], final["head.weight"])


def test_checkpoint_loads_as_a_plain_lightning_checkpoint(pipelined) -> None:
    path = pipelined(2) / "gpt.ckpt"
    torch.load(path, weights_only=True)  # nothing of lightning_rannc is pickled in it
    model = GPT.load_from_checkpoint(path)
    saved = _checkpoint(pipelined(2), "gpt")["state_dict"]
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
    assert model.head.weight is model.tok_emb.weight


def test_dropout_masks_are_reproducible_and_independent_of_schedule_and_split(pipelined) -> None:
    labels = ("drop_gpipe", "drop_1f1b", "drop_gpipe_again", "drop_interleaved", "drop_checkpointed")
    runs = {label: load_record(pipelined("2-dropout"), label, 0)["losses"] for label in labels}
    assert runs["drop_gpipe"] == runs["drop_gpipe_again"]
    torch.testing.assert_close(runs["drop_1f1b"], runs["drop_gpipe"], rtol=1e-6, atol=0)
    # 4 stages instead of 2: the same masks, so the same numbers up to float rounding
    torch.testing.assert_close(runs["drop_interleaved"], runs["drop_gpipe"], rtol=1e-5, atol=0)
    # recomputed activations draw the forward's masks again
    torch.testing.assert_close(runs["drop_checkpointed"], runs["drop_gpipe"], rtol=1e-6, atol=0)
    final = [load_record(pipelined("2-dropout"), label, 0)["final_state"] for label in runs]
    assert all(torch.equal(final[0][k], other[k]) for other in final[1:] for k in final[0])
    # zero bubble's weight pass recomputes the regions with the forward's masks too (its
    # separate weight gradients round differently)
    split = load_record(pipelined("2-dropout"), "drop_zb_checkpointed", 0)
    torch.testing.assert_close(split["losses"], runs["drop_gpipe"], rtol=1e-5, atol=0)
    for key, value in final[0].items():
        torch.testing.assert_close(split["final_state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # verify=True ran the first step unpartitioned with the same masks (it raises otherwise), and
    # left training exactly as it was
    verified = load_record(pipelined("2-dropout"), "drop_verified", 0)
    assert verified["losses"] == runs["drop_gpipe"]


@pytest.mark.parametrize("case", ["gpt_bf16_mixed", "gpt_bf16_true"])
def test_bf16_losses_track_single_process(pipelined, reference, case: str) -> None:
    """bf16 keeps 8 bits of mantissa (unit roundoff 2**-8 = 0.4%). Micro-batching changes the
    order of reductions, so activations differ by a few roundoffs; over 6 steps the loss stays
    within 2% of one device's bf16 run. The fp32 run of the same model shows bf16 was in use."""
    ours = torch.tensor(load_record(pipelined("2-dropout"), case.removeprefix("gpt_"), 0)["losses"])
    ref = torch.tensor(load_record(reference(case, 1), case, 0)["losses"])
    fp32 = torch.tensor(load_record(reference("gpt", 1), "gpt", 0)["losses"])
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=0)
    assert (ours - fp32).abs().max() > 1e-4


def test_batchnorm_statistics_follow_micro_batches(pipelined, tmp_path: Path) -> None:
    """Each micro-batch normalises with its own statistics and updates the running ones, in
    order: one device reading the micro-batches with accumulate_grad_batches=4 is the reference."""
    run_case("cnn_bn", tmp_path, batch_size=2, devices=1, accumulate_grad_batches=4)
    ref = _checkpoint(tmp_path, "cnn_bn")["state_dict"]
    ours = _checkpoint(pipelined(2), "cnn_bn")["state_dict"]
    assert any("running_mean" in k for k in ref) and list(ours) == list(ref)
    for key, value in ref.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-5, msg=key)


def test_batchnorm_statistics_are_equal_on_all_replicas(pipelined) -> None:
    buffers = [load_record(pipelined(4), "cnn_bn_s2d2", rank)["local_buffers"] for rank in range(4)]
    # The profiled split decides which stage holds BatchNorm layers (under load, stage 0 may be
    # the stem alone); the statistics live somewhere and are equal on both replicas of it.
    assert buffers[0] or buffers[1]
    for rank in (0, 1):  # rank r and r + 2 run the same stage on different data
        assert buffers[rank] == buffers[rank + 2]


@pytest.mark.parametrize(("label", "case"), [("fp16", "gpt_fp16"), ("fp16_fused", "gpt_fp16_fused")])
def test_fp16_overflows_skip_the_same_steps_on_every_rank_as_on_one_device(pipelined, reference, label, case) -> None:
    """A fused AdamW unscales in its own step, so Lightning never calls `unscale_` for it."""
    records = [load_record(pipelined("2-dropout"), label, rank) for rank in range(2)]
    ref = load_record(reference(case, 1), case, 0)
    assert records[0]["loss_scales"] == records[1]["loss_scales"] == ref["loss_scales"]
    assert ref["loss_scales"][0] < 2.0**16  # the first step overflowed (on the last stage only) and was skipped
    torch.testing.assert_close(torch.tensor(records[0]["losses"]), torch.tensor(ref["losses"]), rtol=2e-2, atol=0)


def test_meta_device_module_initialises_each_stage_on_its_rank_as_one_device_would(pipelined, tmp_path: Path) -> None:
    """Initialisation is seeded per module, so two stages on two ranks start from the weights
    one stage on one process gets; each rank only ever allocates its own stage."""
    run_case("gpt_meta", tmp_path, strategy=RaNNCStrategy(), devices=1)
    ours, single = load_record(pipelined("2-dropout"), "meta", 0), load_record(tmp_path, "gpt_meta", 0)
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=0)
    ckpt, single_ckpt = _checkpoint(pipelined("2-dropout"), "meta"), _checkpoint(tmp_path, "gpt_meta")
    for key, value in single_ckpt["state_dict"].items():
        torch.testing.assert_close(ckpt["state_dict"][key], value, rtol=1e-5, atol=1e-5, msg=key)
    plan = PartitionPlan.from_json(ours["plan"])
    for rank in range(2):
        record = load_record(pipelined("2-dropout"), "meta", rank)
        assert set(record["kept_params"]) == set(plan.stages[rank].tensor_names) & set(single_ckpt["state_dict"])
        # the module stays partitioned after fit: never gathered whole on any rank
        assert set(record["final_state"]) < set(single_ckpt["state_dict"])
    assert single["losses"][-1] < single["losses"][0]


def test_meta_device_module_under_zero_3_keeps_on_each_replica_only_what_it_holds(pipelined, tmp_path: Path) -> None:
    """Two replicas of one stage, each parameter on one of them: the numbers of one device."""
    run_case("gpt_meta", tmp_path, strategy=RaNNCStrategy(), devices=1, batch_scale=2)
    ours, single = load_record(pipelined("2-dropout"), "meta_zero3", 0), load_record(tmp_path, "gpt_meta", 0)
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=0)
    ckpt, single_ckpt = _checkpoint(pipelined("2-dropout"), "meta_zero3"), _checkpoint(tmp_path, "gpt_meta")
    for key, value in single_ckpt["state_dict"].items():
        # Adam amplifies the replicas' other summation order: plain DDP drifts ~3e-4 from one
        # process after 6 steps (max-relative); measured here 2e-4.
        drift = (ckpt["state_dict"][key] - value).abs().max() / value.abs().max()
        assert drift <= 3e-4, key
    kept = [set(load_record(pipelined("2-dropout"), "meta_zero3", rank)["kept_params"]) for rank in range(2)]
    assert not kept[0] & kept[1] and kept[0] | kept[1] == set(single["kept_params"]) and all(kept)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_nodes(commands: list[list[str]], envs: list[dict[str, str]]) -> list[str]:
    """Start one process per "node", wait for all; kill every one left after the timeout."""
    nodes = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        for command, env in zip(commands, envs)
    ]
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    return outputs


_EXTERNAL = SCRIPTS / "external_rank.py"
_OWN_ENV = script_env(
    {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "MASTER_PORT")}
)


def _two_nodes_like_one_process(reference, out_dir: Path, label: str, outputs: list[str], environment: str) -> None:
    assert f"cluster environment: {environment}" in outputs[0]
    assert "inter-node" in outputs[0] and "intra-node -" in outputs[0]  # the links were measured across nodes
    ours, ref = load_record(out_dir, label, 0), load_record(reference("gpt", 1), "gpt", 0)
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    assert [s.ranks for s in PartitionPlan.from_json(ours["plan"]).stages] == [[0], [1]]


def test_two_torchrun_nodes_train_like_one_process(reference, tmp_path: Path) -> None:
    """``torchrun`` on two "nodes" of one device each (localhost): Lightning launches nothing,
    the links between the ranks are measured as inter-node, and the numbers are one device's."""
    port = _free_port()
    commands = [
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
         "--master-addr=127.0.0.1", f"--master-port={port}", str(_EXTERNAL), str(tmp_path), "2", "torchrun"]
        for rank in (0, 1)
    ]  # fmt: skip
    outputs = _run_nodes(commands, [_OWN_ENV, _OWN_ENV])
    _two_nodes_like_one_process(reference, tmp_path, "torchrun", outputs, "TorchElasticEnvironment")


def test_two_slurm_nodes_train_like_one_process(reference, tmp_path: Path) -> None:
    """``srun`` on two "nodes" of one task each, simulated on localhost with the variables srun
    sets: Lightning's SLURM environment gives the ranks and launches nothing."""
    slurm = {
        "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "rannc",
        "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "127.0.0.1", "SLURM_LOCALID": "0", "MASTER_PORT": str(_free_port()),
    }  # fmt: skip
    envs = [{**_OWN_ENV, **slurm, "SLURM_PROCID": str(rank), "SLURM_NODEID": str(rank)} for rank in (0, 1)]
    command = [sys.executable, str(_EXTERNAL), str(tmp_path), "2", "slurm"]
    outputs = _run_nodes([command, command], envs)
    _two_nodes_like_one_process(reference, tmp_path, "slurm", outputs, "SLURMEnvironment")


def test_resuming_gives_one_devices_losses_from_any_world_size(tmp_path: Path) -> None:
    """Checkpoints after 3 of 6 steps: plain Lightning's resumed on 2 processes, ours (2 stages)
    resumed on 2 and on 3 processes (re-planned, state re-sharded). Each continues exactly as
    plain Lightning resuming its own checkpoint on one process (a mid-epoch resume restarts the
    epoch's data in both, as Lightning does for loaders without state)."""
    run_case("gpt_full", tmp_path, label="plain_half", devices=1, max_steps=3)
    run_case("gpt_full", tmp_path, label="plain_resumed", devices=1, ckpt_path=tmp_path / "plain_half.ckpt")
    two = [
        {"label": "from_plain", "case": "gpt_full", "strategy": {"pipeline_stages": 2},
         "resume": str(tmp_path / "plain_half.ckpt")},
        {"label": "half", "case": "gpt_full", "strategy": {"pipeline_stages": 2}, "trainer": {"max_steps": 3}},
        {"label": "resumed", "case": "gpt_full", "strategy": {"pipeline_stages": 2}, "resume": "half"},
    ]  # fmt: skip
    run_script("run_pipelined.py", str(tmp_path), "2", json.dumps(two), timeout=400)
    three = [{"label": "resumed_on_3", "case": "gpt_full", "strategy": {"pipeline_stages": 3}, "resume": "half"}]
    run_script("run_pipelined.py", str(tmp_path), "3", json.dumps(three), timeout=400)
    ref = load_record(tmp_path, "plain_resumed", 0)
    assert len(ref["losses"]) == 6
    for label in ("from_plain", "resumed", "resumed_on_3"):
        ours = load_record(tmp_path, label, 0)
        torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
        for key, value in ref["final_state"].items():
            torch.testing.assert_close(ours["final_state"][key], value, rtol=1e-5, atol=1e-5, msg=f"{label}: {key}")
    half, plain_half = _checkpoint(tmp_path, "half"), _checkpoint(tmp_path, "plain_half")
    assert half["global_step"] == plain_half["global_step"] == 3
    assert half["lr_schedulers"] == plain_half["lr_schedulers"]


def test_sharded_checkpoints_are_written_without_a_gather_and_consolidate_to_one_devices(tmp_path: Path) -> None:
    """``state_dict_type="sharded"`` on 2 stages x 2 replicas: each rank writes its own tensors;
    the directory consolidates into the checkpoint plain Lightning writes, and resuming from the
    directory continues as plain Lightning resuming its own. Under ZeRO-3, where
    each parameter is held by one replica (a stand-in elsewhere, which takes the state a
    resumed optimizer loaded for the parameter)."""
    run_case("gpt_full", tmp_path, label="plain_half", devices=1, max_steps=3, batch_scale=2)
    run_case("gpt_full", tmp_path, label="plain_resumed", devices=1, batch_scale=2,
             ckpt_path=tmp_path / "plain_half.ckpt")  # fmt: skip
    sharded = {"pipeline_stages": 2, "state_dict_type": "sharded", "zero_stage": 3}
    four = [{"label": "sharded_half", "case": "gpt_full", "strategy": sharded, "trainer": {"max_steps": 3}}]
    run_script("run_pipelined.py", str(tmp_path), "4", json.dumps(four), timeout=400)
    directory = tmp_path / "sharded_half.ckpt"
    shards = sorted(directory.glob("*.distcp"))
    assert directory.is_dir() and len(shards) == 4 and (directory / "meta.pt").is_file()
    total = sum(s.stat().st_size for s in shards)
    # Every rank wrote a share, none the whole. How even the shares are follows the split, which
    # follows block times measured on a shared CPU: 62/35% of the bytes in one run, more uneven
    # under load.
    assert all(0 < s.stat().st_size < 0.95 * total for s in shards), [s.stat().st_size for s in shards]
    assert main_cli(["consolidate", str(directory), str(tmp_path / "merged.ckpt")]) == 0
    merged, plain = _checkpoint(tmp_path, "merged"), _checkpoint(tmp_path, "plain_half")
    assert sorted(merged["state_dict"]) == sorted(plain["state_dict"])  # the same keys (in its own order)
    for key, value in plain["state_dict"].items():
        torch.testing.assert_close(merged["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    ours_state, plain_state = merged["optimizer_states"][0], plain["optimizer_states"][0]
    assert ours_state["param_groups"] == plain_state["param_groups"]
    assert ours_state["state"].keys() == plain_state["state"].keys()
    for index, state in plain_state["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(ours_state["state"][index][key], value, rtol=1e-5, atol=1e-6)
    assert merged["global_step"] == 3 and merged["lr_schedulers"] == plain["lr_schedulers"]
    resume = [{"label": "sharded_resumed", "case": "gpt_full", "strategy": sharded, "resume": str(directory)}]
    run_script("run_pipelined.py", str(tmp_path), "4", json.dumps(resume), timeout=400)
    ours, ref = load_record(tmp_path, "sharded_resumed", 0), load_record(tmp_path, "plain_resumed", 0)
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)


def test_runtime_trace_has_every_forward_and_backward_of_every_rank(tmp_path: Path) -> None:
    trace = tmp_path / "trace.json"
    strategy = {"pipeline_stages": 2, "micro_batches": 4, "schedule": "1f1b", "zero_bubble": False}
    strategy |= {"trace": str(trace), "trace_steps": 3}
    runs = [{"label": "traced", "case": "gpt_full", "strategy": strategy}]
    run_script("run_pipelined.py", str(tmp_path), "2", json.dumps(runs), timeout=300)
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e["pid"]: e["args"] for e in events if e["name"] == "process_name"}
    assert names == {0: {"name": "rank 0", "clock": 0}, 1: {"name": "rank 1", "clock": 0}}  # one host
    timed = [e for e in events if e["ph"] == "X"]
    assert all(e["ts"] >= 0 and e["dur"] > 0 for e in timed)
    # on the host's one clock every message is causal as written: each activation arrives after the
    # forward that made it ended, each gradient after its backward (no alignment needed, none made)
    ends = {(e["pid"], e["args"]["step"], e["name"]): e["ts"] + e["dur"] for e in timed if e["tid"] == 0}
    receives = [(e, op) for e in timed if e["cat"] == "communication" for op in e["args"]["ops"] if "recv" in op]
    assert {op[5] for _, op in receives} == {"F", "B"}
    for e, op in receives:
        made = ends[(1 - e["pid"], e["args"]["step"], op[5:])]
        assert e["ts"] + e["dur"] >= made, (e, op, made)
    assert read_measured_step(trace).clock_offsets_ms == {}
    for rank in (0, 1):
        mine = [e for e in timed if e["pid"] == rank]
        for kind in ("F", "B"):  # 3 steps x 4 micro-batches, each once, on this rank's stage
            done = sorted((e["args"]["step"], e["args"]["micro_batch"]) for e in mine if e["name"][0] == kind)
            assert done == [(step, m) for step in (1, 2, 3) for m in range(4)]
            assert {e["args"]["stage"] for e in mine if e["name"][0] == kind} == {rank}
        compute = sorted((e["ts"], e["ts"] + e["dur"]) for e in mine if e["tid"] == 0)
        assert all(a[1] <= b[0] + 0.5 for a, b in zip(compute, compute[1:]))  # one stage runs one thing at a time
        assert [e["args"]["step"] for e in mine if e["name"] == "tied-weight gradient sum"] == [1, 2, 3]
        assert [e["args"]["step"] for e in mine if e["name"] == "optimizer step"] == [2]  # accumulates 2 batches
