"""The plan file (JSON, validation, ranks on the mesh) as the search makes it, and the schedule it picks."""

import json
import warnings
from typing import Any

import pytest

from lightning_rannc import PartitionPlan, PlanError, StagePlan
from lightning_rannc.plan.cost_model import BlockCost
from lightning_rannc.plan.memory import TensorTable
from lightning_rannc.plan.modules import describe_span
from lightning_rannc.plan.plan import stage_position, stage_ranks
from lightning_rannc.plan.search import SearchResult, SearchSettings, search_plan
from lightning_rannc.plan.simulate import simulate_schedule

from helpers.devices import test_device

# No overheads and plenty of memory: stage times are the blocks' own, and every split fits.
DEVICE = test_device(10**10)
NAMES = [f"layers.{i}.weight" for i in range(5)] + ["emb.weight"]


def _blocks() -> list[BlockCost]:
    times = [1.0, 3.0, 1.0, 1.0, 2.0]
    return [
        BlockCost(
            start=i * 10,
            end=i * 10 + 10,
            fwd_ms=t,
            bwd_ms=2 * t,
            activation_bytes=100 * (i + 1),
            cut_bytes=64,
            tensor_names=(f"layers.{i}.weight", "emb.weight") if i in (0, 4) else (f"layers.{i}.weight",),
            module_paths=(f"layers.{i}",),
        )
        for i, t in enumerate(times)
    ]


def _search(
    stages: int = 2,
    *,
    replicas: int = 1,
    virtual: int = 1,
    schedule: str = "auto",
    microbatches: int | None = 4,
    replica_batch: int | None = None,
) -> SearchResult:
    """The search with the layout forced: ``stages`` ranks per pipeline, ``virtual`` stages per
    rank, micro-batches of 2 samples unless ``microbatches`` is None (then the search picks a
    count for ``replica_batch`` samples per replica)."""
    samples = replica_batch if replica_batch is not None else 2 * (microbatches or 1)
    settings = SearchSettings(
        num_devices=stages * replicas,
        global_batch_size=samples * replicas,
        device=DEVICE,
        pipeline_stages=stages,
        replicas=replicas,
        micro_batches=microbatches,
        virtual_stages=virtual,
        schedule=schedule,
    )
    tensors = TensorTable({n: 40 for n in NAMES}, {n: 10 for n in NAMES}, frozenset(NAMES))
    return search_plan(
        _blocks(), reference_microbatch_size=2, settings=settings, tensors=tensors, graph_fingerprint="abc"
    )


def _plan(stages: int = 2, **options: Any) -> PartitionPlan:
    return _search(stages, **options).plan


def test_plan_balances_profiled_time_and_lists_stage_contents() -> None:
    plan = _plan()
    assert [(s.node_start, s.node_end) for s in plan.stages] == [(0, 20), (20, 50)]
    assert plan.stages[1].tensor_names == ["layers.2.weight", "layers.3.weight", "layers.4.weight", "emb.weight"]
    assert plan.stages[1].num_params == 40
    assert plan.stages[0].module_span == "layers.0-1"
    assert plan.stages[0].fwd_ms == 4.0 and plan.stages[0].bwd_ms == 8.0
    assert plan.graph_fingerprint == "abc" and plan.predicted_step_ms > 0


def test_plan_round_trips_through_json(tmp_path) -> None:
    plan = _plan(3)
    plan.no_grad_values = ["detach"]
    path = tmp_path / "plan.json"
    plan.save(path)
    assert PartitionPlan.load(path) == plan
    assert json.loads(path.read_text())["stages"][2]["ranks"] == [2]


def test_plan_summary_has_one_line_per_stage() -> None:
    lines = _plan(2).summary()
    assert len(lines) == 3
    assert "stage 1 ranks=[1] modules=[layers.2-4]" in lines[2]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update(version=99), "format version 99"),
        (lambda d: d["stages"][1].update(node_start=25), "not contiguous"),
        (lambda d: d["stages"][1].update(ranks=[0]), r"Stage 1 must run on ranks \[1\], not \[0\]"),
        (lambda d: d.update(world_size=4), r"world_size \(4\) must equal replicas \(1\) x pipeline ranks \(2\)"),
        (lambda d: d.update(virtual_stages=2), "needs schedule='interleaved_1f1b'"),
        (lambda d: d.update(schedule="zigzag"), "Unknown schedule 'zigzag'"),
        (lambda d: d["stages"][0].pop("ranks"), "Not a valid lightning_rannc plan"),
    ],
)
def test_corrupted_plans_are_rejected_with_the_broken_rule(edit, match: str) -> None:
    data = json.loads(_plan().to_json())
    edit(data)
    with pytest.raises(PlanError, match=match):
        PartitionPlan.from_json(json.dumps(data))


def test_truncated_plan_file_is_rejected() -> None:
    with pytest.raises(PlanError, match="Not a valid lightning_rannc plan"):
        PartitionPlan.from_json(_plan().to_json()[:50])


def test_stage_of_rank_names_unknown_ranks() -> None:
    plan = _plan()
    assert plan.stage_of_rank(1).stage_index == 1
    with pytest.raises(PlanError, match="Rank 5 has no stage"):
        plan.stage_of_rank(5)


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        (["emb", "blocks.0.attn", "blocks.0.mlp", "blocks.1", "blocks.2.ln"], "emb, blocks.0-2"),
        (["blocks.3", "ln_f", "head", ""], "blocks.3, ln_f, head, <top>"),
        (["a.0", "a.2", "b.1"], "a.0, a.2, b.1"),
        # transformers nests its layers deeper: the layer is the path up to its index
        (
            ["model.transformer.wte", "model.transformer.h.0.attn", "model.transformer.h.1.mlp.c_fc"],
            "model.transformer, model.transformer.h.0-1",
        ),
    ],
)
def test_describe_span_compresses_numbered_modules(paths: list[str], expected: str) -> None:
    assert describe_span(paths) == expected


def test_stage_plan_is_plain_data() -> None:
    stage = _plan().stages[0]
    assert isinstance(stage, StagePlan)
    assert StagePlan(**json.loads(json.dumps(stage.__dict__))) == stage


def test_replicas_and_virtual_stages_place_stages_on_the_mesh() -> None:
    plan = _plan(2, replicas=2, virtual=2, schedule="interleaved_1f1b")
    assert plan.world_size == 4 and plan.pipeline_stages == 2
    assert [s.ranks for s in plan.stages] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [s.stage_index for s in plan.stages_of_rank(3)] == [1, 3]
    assert plan.schedule == "interleaved_1f1b"
    assert PartitionPlan.from_json(plan.to_json()) == plan


def test_zbv_places_stages_in_a_v_and_hands_over_at_its_turn_without_a_send() -> None:
    plan = _plan(2, replicas=2, virtual=2, schedule="zbv")
    assert (plan.schedule, plan.zero_bubble, plan.virtual_stages, plan.num_stages) == ("zbv", True, 2, 4)
    assert [s.ranks for s in plan.stages] == [[0, 2], [1, 3], [1, 3], [0, 2]]
    assert [s.stage_index for s in plan.stages_of_rank(2)] == [0, 3]  # the first and the last stage
    assert plan.stages[1].send_ms == 0.0 < plan.stages[0].send_ms  # stages 1 and 2 share rank 1
    assert PartitionPlan.from_json(plan.to_json()) == plan
    assert [stage_position(i, 3, "zbv") for i in range(6)] == [0, 1, 2, 2, 1, 0]
    assert [stage_position(i, 3, "interleaved_1f1b") for i in range(6)] == [0, 1, 2, 0, 1, 2]
    # any count of at least one per rank: no whole rounds (6 samples as 3 micro-batches of 2)
    assert plan.microbatches_for(6) == 3
    with pytest.raises(PlanError, match="schedule='zbv' runs two stages per rank as zero bubble"):
        _plan(2, virtual=3, schedule="zbv")
    with pytest.raises(PlanError, match="schedule='zbv' places two stages on each rank .* two ranks at least"):
        _plan(1, virtual=2, schedule="zbv")
    data = json.loads(plan.to_json())
    data.update(zero_bubble=False)
    with pytest.raises(PlanError, match="schedule='zbv' runs two stages per rank as zero bubble"):
        PartitionPlan.from_json(json.dumps(data))


def test_stage_ranks_keep_a_pipeline_on_neighbouring_ranks() -> None:
    assert [stage_ranks(i, 4, 2) for i in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.parametrize(
    ("requested", "stages", "microbatches", "virtual", "expected"),
    [
        ("auto", 2, 4, 1, "1f1b"),
        ("auto", 4, 2, 1, "gpipe"),
        # two stages a rank: ZB-V's V splits blocks of 1, 3, 1, 1, 2 ms as 1 + 3 against 3 + 1 a
        # rank, where the looped placement's best split loads its ranks 3 and 5
        ("auto", 2, 4, 2, "zbv"),
        ("interleaved_1f1b", 2, 4, 2, "interleaved_1f1b"),
        ("gpipe", 2, 4, 1, "gpipe"),
    ],
)
def test_auto_schedule(requested: str, stages: int, microbatches: int, virtual: int, expected: str) -> None:
    plan = _plan(stages, microbatches=microbatches, virtual=virtual, schedule=requested)
    assert plan.schedule == expected and plan.virtual_stages == virtual


def test_schedule_requests_that_cannot_run_are_refused() -> None:
    # 1F1B needs a micro-batch per stage to fill the pipeline: 2 for 4 stages is never planned
    with pytest.raises(PlanError, match=r"No micro-batch count splits the global batch of 4"):
        _plan(4, microbatches=2, schedule="1f1b")
    free = _search(4, microbatches=None, replica_batch=8, schedule="1f1b")
    assert sorted(c.microbatches for c in free.candidates if not c.zero_bubble) == [4, 8]
    assert free.plan.schedule == "1f1b" and free.plan.num_microbatches >= 4
    with pytest.raises(PlanError, match="Unknown schedule 'zb'"):
        _plan(2, microbatches=2, schedule="zb")


def test_simulated_step_counts_the_bubble_and_shrinks_it_with_virtual_stages() -> None:
    # stages of 1 and 2 ms (forward + backward): 4 micro-batches on the slower stage, plus the
    # faster stage's forward of the first and backward of the last (the bubble)
    uneven = simulate_schedule([1 / 3, 2 / 3], [2 / 3, 4 / 3], [0.0, 0.0], 4, "1f1b").makespan_ms
    assert uneven == pytest.approx(4 * 2.0 + 1 * 1.0) and uneven > 4 * 2.0
    # 2 ranks of 2 ms each: M + S - 1 slots; as 4 stages of 1 ms, interleaved, the bubble is 1 ms
    plain = simulate_schedule([1.0, 1.0], [1.0, 1.0], [0.0, 0.0], 4, "1f1b").makespan_ms
    interleaved = simulate_schedule([0.5] * 4, [0.5] * 4, [0.0] * 4, 4, "interleaved_1f1b", 2).makespan_ms
    assert plain == pytest.approx((4 + 1) * 2.0)
    assert interleaved == pytest.approx(4 * 2.0 + 1 * 1.0) and interleaved < plain


def test_saved_plan_leaves_no_temporary_file_and_names_every_stale_field(tmp_path) -> None:
    plan = _plan()
    plan.save(tmp_path / "plan.json")
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
    plan.check_matches("plan.json", world_size=2, graph_fingerprint="abc")
    with pytest.raises(PlanError, match=r"world_size: saved 2, now 4, graph_fingerprint: saved 'abc', now 'xyz'"):
        plan.check_matches("plan.json", world_size=4, graph_fingerprint="xyz")
    plan.save(tmp_path / "plans" / "new" / "plan.json")  # a deployment's folder is made when missing
    assert PartitionPlan.load(tmp_path / "plans" / "new" / "plan.json") == plan


def test_counts_for_interleaved_and_zero_bubble_schedules_split_into_whole_rounds() -> None:
    from lightning_rannc.plan.plan import choose_microbatches, rounds_fit

    assert [m for m in range(1, 11) if rounds_fit(m, 2)] == [1, 2, 3, 4, 6, 8, 10]  # 5: 2 rounds of 2.5
    assert choose_microbatches(10, 4, minimum=2) == 5
    assert choose_microbatches(10, 4, minimum=2, rounds_of=2) == 2  # 5 would not split into rounds


def test_an_adjusted_micro_batch_count_is_explained_by_what_forced_it() -> None:
    """Fewer micro-batches than the schedule fills its stages with, or a count the batch does not
    divide: the warning says which, and what keeps the count (a 3-stage zero-bubble run asked
    for 2 was told to use a batch size that 2 divides, which 8 already was)."""
    from lightning_rannc.runtime.built import warn_if_adjusted

    with pytest.warns(UserWarning, match=r"runs as 4 micro-batch\(es\) of 2, not 2: the schedule needs at least 3"):
        warn_if_adjusted(8, 2, 4, minimum=3)
    with pytest.warns(UserWarning, match=r"runs as 3 micro-batch\(es\) of 2, not 4: .* batch size that 4 divides"):
        warn_if_adjusted(6, 4, 3, minimum=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_adjusted(8, 4, 4, minimum=2)  # kept: nothing to say


def test_a_selective_cut_moves_with_its_stage_onto_another_capture() -> None:
    """A batch of another shape is captured again; the stages' node ranges, and the node up to
    which a stage recomputes, move to the matching nodes. A cut that no longer falls inside its
    stage makes the whole stage recompute (never more memory than planned)."""
    import dataclasses

    from lightning_rannc.runtime.evaluation import moved_stages

    plan = _plan()  # stages (0, 20) and (20, 50)
    plan.stages[1] = dataclasses.replace(
        plan.stages[1], recompute_end=30, recompute_cuts=[24], recompute_span="layers.2"
    )
    shifted = {i: i + 5 for i in range(50)}  # five nodes more before every node
    moved = moved_stages(plan, shifted, 55)
    assert [(s.node_start, s.node_end, s.recompute_end) for s in moved] == [(0, 25, None), (25, 55, 35)]
    assert moved[1].recompute_cuts == [29]  # each recomputed layer's region moves too
    collapsed = {i: (i if i < 20 else 40) for i in range(50)}  # nodes 20-49 all match node 40 on
    moved = moved_stages(plan, collapsed, 55)
    assert moved[1].recompute_end is None and moved[1].checkpoint and moved[1].recompute_cuts == []
