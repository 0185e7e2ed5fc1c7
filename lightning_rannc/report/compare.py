"""A plan's predicted actions beside what a runtime trace measured, as medians.

``python -m lightning_rannc show plan.json --measured trace.json`` prints, for each stage, the
forward and backward of one micro-batch as the plan predicted them and as the trace measured
them (medians over the recorded steps after the first, which includes warm-up, and over the
stage's ranks and micro-batches), then the whole step, the collectives after the schedule and
the optimizer step. A step that misses its prediction while every action meets its own points at
the machine (waits, a neighbour's load) rather than at the cost model; an action that misses in
every step points at the cost model (or at a profile taken while the machine ran at another
speed). To tell the two apart, the plan's schedule is also replayed with the measured actions
(``Comparison.replayed_step_ms``): where that meets the measured step, the schedule model (the
order, the waits, the sends) is right and the step's miss is the actions'.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_rannc.plan.plan import PartitionPlan
from lightning_rannc.plan.simulate import plan_action_ms, simulate_plan
from lightning_rannc.report.measured import (
    MeasuredStep,
    check_measured,
    load_trace,
    read_measured_step,
    steps_text,
)

__all__ = ["StageComparison", "Comparison", "compare_with_trace", "comparison_text"]


@dataclass(frozen=True)
class StageComparison:
    """One stage's actions per micro-batch, in ms: predicted, and the measured median."""

    stage: int
    predicted_forward_ms: float
    measured_forward_ms: float
    predicted_backward_ms: float
    """With zero bubble the input and the weight pass together."""
    measured_backward_ms: float


@dataclass(frozen=True)
class Comparison:
    """A plan against the medians of a runtime trace's steps (``steps``)."""

    steps: list[int]
    stages: list[StageComparison]
    predicted_step_ms: float
    measured_step_ms: float
    """From a step's first event to its last on any rank (Lightning's own work between steps is
    outside it)."""
    waiting_ms: float
    """The most any rank waited on sends and receives in a step."""
    predicted_exchange_ms: float
    """The replicas' gradient exchange the schedule does not hide."""
    measured_exchange_ms: float
    """The collectives after the schedule (gradient exchange, tied-weight sums, the loss shared)
    on the rank that spent the least time in them: the others also wait there for the last."""
    predicted_update_ms: float
    """The optimizer step and the step's fixed overhead (``DeviceSpec.step_overhead_ms``: the
    training loop, the small collectives)."""
    measured_update_ms: float
    """The optimizer step (the slowest rank's); the training loop between steps is outside the trace."""
    replayed_step_ms: float
    """The plan's schedule replayed with each stage's measured actions (medians; with zero bubble
    its input and weight passes apart), plus the measured collectives and optimizer step: what
    the cost model would have predicted with a perfect profile. NaN where a stage has no action
    in the trace."""
    clock_offsets_ms: dict[int, float] = field(default_factory=dict)
    """What was added to each rank's times to align the ranks' clocks (``measured.clock_offsets``)."""


def compare_with_trace(
    plan: PartitionPlan, trace: str | Path | Mapping[str, Any] | Sequence[Mapping[str, Any]]
) -> Comparison:
    """Compare ``plan`` with the runtime trace ``RaNNCStrategy(trace=...)`` wrote for a run of it.
    Raises ``PlanError`` for a file that is not a runtime trace, or one recorded on another
    number of ranks than the plan's."""
    events = load_trace(trace)
    last = read_measured_step(events)
    check_measured(plan, last)
    steps = last.steps[1:] or last.steps  # the first step includes warm-up
    measured = [read_measured_step(events, step) for step in steps]
    forwards, backwards, weights = plan_action_ms(plan)
    per_stage = _actions_per_stage(measured)
    exchange = _median_over_steps(measured, "collective", min)
    update = _median_over_steps(measured, "optimizer", max)
    stages = [
        StageComparison(
            stage=stage.stage_index,
            predicted_forward_ms=forwards[stage.stage_index],
            measured_forward_ms=_median(per_stage["F"].get(stage.stage_index, [])),
            predicted_backward_ms=backwards[stage.stage_index] + (weights[stage.stage_index] if weights else 0.0),
            measured_backward_ms=_median(per_stage["B"].get(stage.stage_index, [])),
        )
        for stage in plan.stages
    ]
    return Comparison(
        steps=steps,
        stages=stages,
        predicted_step_ms=plan.predicted_step_ms,
        measured_step_ms=statistics.median(step.duration_ms for step in measured),
        waiting_ms=_median_over_steps(measured, "communication", max),
        predicted_exchange_ms=plan.predicted_exchange_ms,
        measured_exchange_ms=exchange,
        predicted_update_ms=plan.predicted_update_ms,
        measured_update_ms=update,
        replayed_step_ms=_replayed_schedule_ms(plan, per_stage) + exchange + update,
        clock_offsets_ms=last.clock_offsets_ms,
    )


def comparison_text(comparison: Comparison, source: str = "the trace") -> str:
    """The comparison as a table, predicted -> measured (measured / predicted in brackets)."""
    lines = [
        f"predicted -> measured (medians of {source}'s steps {steps_text(comparison.steps)}), ms:",
        f"{'stage':>5}  {'forward / micro-batch':<26}{'backward / micro-batch':<26}",
    ]
    for stage in comparison.stages:
        forward = _pair(stage.predicted_forward_ms, stage.measured_forward_ms)
        backward = _pair(stage.predicted_backward_ms, stage.measured_backward_ms)
        lines.append(f"{stage.stage:>5}  {forward:<26}{backward:<26}")
    lines.append(f"step: {_pair(comparison.predicted_step_ms, comparison.measured_step_ms)}")
    lines.append(
        "step from the measured actions (the schedule replayed with them, plus the measured collectives and "
        f"optimizer): {_pair(comparison.replayed_step_ms, comparison.measured_step_ms)}"
    )
    lines.append(
        f"after the schedule: predicted exchange {comparison.predicted_exchange_ms:,.1f} + optimizer and step "
        f"overhead {comparison.predicted_update_ms:,.1f}; measured collectives {comparison.measured_exchange_ms:,.1f} "
        f"(the rank that waited least) + optimizer {comparison.measured_update_ms:,.1f}"
    )
    lines.append(f"waiting on send/recv: {comparison.waiting_ms:,.1f} (the most any rank waited in a step)")
    if comparison.clock_offsets_ms:
        shifts = ", ".join(f"rank {rank} {ms:+,.1f}" for rank, ms in sorted(comparison.clock_offsets_ms.items()))
        lines.append(f"ranks' clocks aligned by their sends and receives: {shifts} ms")
    return "\n".join(lines)


def _actions_per_stage(measured: Sequence[MeasuredStep]) -> dict[str, dict[int, list[float]]]:
    """Per kind, per stage, the duration of every (step, rank, micro-batch). Kinds: ``F``; ``I``:
    the backward, with zero bubble its input pass (the runtime names it ``B``, the simulator
    ``I``); ``W``: the weight pass; ``B``: ``I`` and ``W`` together."""
    totals: dict[tuple[str, int, int, int, int], float] = defaultdict(float)
    for step in measured:
        for rank, events in step.rows.items():
            for e in events:
                if e.category in ("forward", "backward"):
                    kind = "F" if e.category == "forward" else "W" if e.name.startswith("W") else "I"
                    key = (int(e.args["stage"]), step.step, rank, int(e.args["micro_batch"]))
                    totals[(kind, *key)] += e.end_ms - e.start_ms
                    if kind != "F":
                        totals[("B", *key)] += e.end_ms - e.start_ms
    durations: dict[str, dict[int, list[float]]] = {kind: defaultdict(list) for kind in "FIWB"}
    for (kind, stage, *_), ms in totals.items():
        durations[kind][stage].append(ms)
    return durations


def _replayed_schedule_ms(plan: PartitionPlan, per_stage: Mapping[str, Mapping[int, list[float]]]) -> float:
    """The plan's schedule replayed with the measured actions' medians (and the plan's send times)."""
    stages = range(len(plan.stages))
    forwards = [_median(per_stage["F"].get(s, [])) for s in stages]
    backwards = [_median(per_stage["I"].get(s, [])) for s in stages]
    weights = [_median(per_stage["W"].get(s, [])) for s in stages] if plan.zero_bubble else None
    if any(math.isnan(ms) for ms in [*forwards, *backwards, *(weights or [])]):
        return float("nan")
    return simulate_plan(plan, (forwards, backwards, weights)).makespan_ms


def _median_over_steps(
    measured: Sequence[MeasuredStep], category: str, pick: Callable[[Iterable[float]], float]
) -> float:
    """Median over the steps of the time in events of ``category``, of the rank ``pick`` (max or
    min) selects."""
    return statistics.median(
        pick(sum(e.end_ms - e.start_ms for e in events if e.category == category) for events in step.rows.values())
        for step in measured
    )


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _pair(predicted: float, measured: float) -> str:
    ratio = f" ({measured / predicted:.2f}x)" if predicted > 0 and not math.isnan(measured) else ""
    return f"{predicted:,.1f} -> {measured:,.1f}{ratio}"
