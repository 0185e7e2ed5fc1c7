import json

import pytest

from lightning_rannc import PartitionPlan, PlanError, StagePlan
from lightning_rannc.plan.cost_model import BlockCost
from lightning_rannc.plan.planner import describe_span, plan_pipeline


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


def _plan(num_stages: int = 2) -> PartitionPlan:
    names = [f"layers.{i}.weight" for i in range(5)] + ["emb.weight"]
    return plan_pipeline(
        _blocks(),
        num_stages=num_stages,
        num_microbatches=4,
        microbatch_size=2,
        graph_fingerprint="abc",
        tensor_bytes={n: 40 for n in names},
        tensor_numel={n: 10 for n in names},
    )


def test_plan_balances_profiled_time_and_lists_stage_contents() -> None:
    plan = _plan()
    assert [(s.node_start, s.node_end) for s in plan.stages] == [(0, 20), (20, 50)]
    assert plan.stages[1].tensor_names == ["layers.2.weight", "layers.3.weight", "layers.4.weight", "emb.weight"]
    assert plan.stages[1].num_params == 40
    assert plan.stages[0].module_span == "layers.0-1"
    assert plan.stages[0].fwd_ms == 4.0 and plan.stages[0].bwd_ms == 8.0
    assert plan.predicted_step_ms > 0


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
        (lambda d: d["stages"][1].update(ranks=[0]), "each of the 2 ranks once"),
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
    ],
)
def test_describe_span_compresses_numbered_modules(paths: list[str], expected: str) -> None:
    assert describe_span(paths) == expected


def test_stage_plan_is_plain_data() -> None:
    stage = _plan().stages[0]
    assert isinstance(stage, StagePlan)
    assert StagePlan(**json.loads(json.dumps(stage.__dict__))) == stage
