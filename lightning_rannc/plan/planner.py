"""Turn block costs into a ``PartitionPlan``: the stage split for a fixed stage count."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from lightning_rannc.errors import PlanError
from lightning_rannc.plan.cost_model import BlockCost, estimate_stage_ms, estimate_step_ms
from lightning_rannc.plan.plan import SCHEDULES, PartitionPlan, StagePlan, stage_ranks
from lightning_rannc.plan.solver import solve_min_max_partition

__all__ = ["plan_pipeline", "describe_span", "choose_schedule"]

# 10 GB/s, RaNNC's fixed point-to-point figure; only tips the balance between equal splits.
DEFAULT_P2P_BYTES_PER_MS = 10e9 / 1e3


def choose_schedule(requested: str, pipeline_degree: int, num_microbatches: int, virtual_stages: int) -> str:
    """Resolve ``"auto"``: interleaved with virtual stages, else 1F1B (fewer activations in
    flight than GPipe, same time) when there are enough micro-batches to fill the pipeline."""
    if requested == "auto":
        if virtual_stages > 1:
            return "interleaved_1f1b"
        return "1f1b" if num_microbatches >= pipeline_degree else "gpipe"
    if requested not in SCHEDULES:
        raise PlanError(f"Unknown schedule {requested!r}; valid: {['auto', *SCHEDULES]}.")
    if requested == "1f1b" and num_microbatches < pipeline_degree:
        raise PlanError(
            f"schedule='1f1b' needs at least as many micro-batches as pipeline stages "
            f"({num_microbatches} < {pipeline_degree}): raise micro_batches or use schedule='gpipe'."
        )
    return requested


def plan_pipeline(
    blocks: Sequence[BlockCost],
    *,
    num_stages: int,
    num_microbatches: int,
    microbatch_size: int,
    graph_fingerprint: str,
    tensor_bytes: Mapping[str, int],
    tensor_numel: Mapping[str, int],
    num_replicas: int = 1,
    virtual_stages: int = 1,
    schedule: str = "auto",
    checkpoint: bool = False,
    p2p_bytes_per_ms: float = DEFAULT_P2P_BYTES_PER_MS,
) -> PartitionPlan:
    """Split ``blocks`` into ``num_stages`` stages minimising the slowest stage.

    ``num_stages`` counts every stage: a pipeline has ``num_stages / virtual_stages`` ranks, and
    ``num_replicas`` copies of the pipeline train on different data.
    """
    if num_stages % virtual_stages:
        raise PlanError(f"{num_stages} stages cannot be spread as {virtual_stages} virtual stages per rank.")
    pipeline_degree = num_stages // virtual_stages

    def cost(i: int, j: int) -> float:
        return estimate_stage_ms(blocks[i:j], p2p_bytes_per_ms, is_last=j == len(blocks))

    bounds, _ = solve_min_max_partition(len(blocks), num_stages, cost)
    stages = [
        _stage_plan(index, blocks[a:b], tensor_bytes, tensor_numel, stage_ranks(index, pipeline_degree, num_replicas))
        for index, (a, b) in enumerate(zip(bounds, bounds[1:]))
    ]
    for stage in stages:
        stage.checkpoint = checkpoint
    stage_ms = [cost(a, b) for a, b in zip(bounds, bounds[1:])]
    plan = PartitionPlan(
        graph_fingerprint=graph_fingerprint,
        world_size=pipeline_degree * num_replicas,
        num_microbatches=num_microbatches,
        microbatch_size=microbatch_size,
        stages=stages,
        schedule=choose_schedule(schedule, pipeline_degree, num_microbatches, virtual_stages),
        num_replicas=num_replicas,
        virtual_stages=virtual_stages,
        predicted_step_ms=estimate_step_ms(stage_ms, num_microbatches, virtual_stages),
    )
    plan.validate()
    return plan


def _stage_plan(
    index: int,
    blocks: Sequence[BlockCost],
    tensor_bytes: Mapping[str, int],
    tensor_numel: Mapping[str, int],
    ranks: list[int],
) -> StagePlan:
    names = list(dict.fromkeys(n for b in blocks for n in b.tensor_names))
    return StagePlan(
        stage_index=index,
        ranks=ranks,
        node_start=blocks[0].start,
        node_end=blocks[-1].end,
        module_span=describe_span([p for b in blocks for p in b.module_paths]),
        tensor_names=names,
        num_params=sum(tensor_numel[n] for n in names),
        fwd_ms=sum(b.fwd_ms for b in blocks),
        bwd_ms=sum(b.bwd_ms for b in blocks),
        param_bytes=sum(tensor_bytes[n] for n in names),
        activation_bytes=sum(b.activation_bytes for b in blocks),
        send_bytes=blocks[-1].cut_bytes,
    )


def describe_span(paths: Sequence[str], depth: int = 2) -> str:
    """Compress module paths into ranges: ``["emb", "blocks.0.attn", "blocks.1"]`` -> ``"emb, blocks.0-1"``."""
    heads = list(dict.fromkeys(".".join(p.split(".")[:depth]) or "<top>" for p in paths))
    parts: list[str] = []
    run: tuple[str, int, int] | None = None
    for head in heads:
        match = re.fullmatch(r"(.*)\.(\d+)", head)
        if match and run and run[0] == match[1] and int(match[2]) == run[2] + 1:
            run = (run[0], run[1], int(match[2]))
            continue
        if run:
            parts.append(_range_text(run))
            run = None
        if match:
            run = (match[1], int(match[2]), int(match[2]))
        else:
            parts.append(head)
    if run:
        parts.append(_range_text(run))
    return ", ".join(parts)


def _range_text(run: tuple[str, int, int]) -> str:
    prefix, first, last = run
    return f"{prefix}.{first}" if first == last else f"{prefix}.{first}-{last}"
