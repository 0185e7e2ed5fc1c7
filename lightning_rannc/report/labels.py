"""What the pictures of a planned step share: how they name its layout, rows and ranks.

The Chrome trace (``chrome_trace.write_trace``) and the Gantt chart (``chart.py``) draw the same
simulated schedule; naming it in one place keeps their titles and rows alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_rannc.errors import PlanError
from lightning_rannc.plan.plan import PartitionPlan, StagePlan
from lightning_rannc.plan.simulate import ScheduleTimes

__all__ = ["Operation", "check_times", "row_stages", "ranks_text", "layout_text"]

Operation = tuple[str, int, float, float]
"""``(kind, micro_batch, start_ms, end_ms)``: one forward (``"F"``) or backward (``"B"``) of a row."""


def check_times(plan: PartitionPlan, times: ScheduleTimes) -> None:
    """Refuse schedule times simulated for another pipeline depth than the plan's."""
    if len(times.operations) != plan.pipeline_stages:
        raise PlanError(
            f"The schedule times have {len(times.operations)} row(s) but the plan's pipelines have "
            f"{plan.pipeline_stages} rank(s); pass the times the plan was searched with (SearchResult.times)."
        )


def row_stages(plan: PartitionPlan) -> list[StagePlan]:
    """The stage that names each row: one row per rank of a pipeline; with interleaved schedules
    the rank's first stage stands for all of its stages."""
    return plan.stages[: plan.pipeline_stages]


def ranks_text(ranks: Sequence[int]) -> str:
    """``[0, 2]``, or ``[0, 4, ..., 28] x8`` for long lists."""
    if len(ranks) <= 4:
        return str(list(ranks))
    return f"[{ranks[0]}, {ranks[1]}, ..., {ranks[-1]}] x{len(ranks)}"


def layout_text(plan: PartitionPlan) -> str:
    """``3 stage(s) x 2 replica(s), 4 micro-batch(es) of 1, 1f1b``."""
    return (
        f"{plan.num_stages} stage(s) x {plan.num_replicas} replica(s), {plan.num_microbatches} micro-batch(es) "
        f"of {plan.microbatch_size}, {plan.schedule}"
    )
