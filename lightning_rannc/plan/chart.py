"""Pictures of a planned pipeline step: a PNG Gantt chart and a Chrome trace.

The plan table gives one number for the step and one for the bubble; it does not show *where*
the stages wait. These draw the simulated schedule (``ScheduleTimes.operations``) that the
prediction came from: one row per stage, a box per forward and backward of each micro-batch,
then the data-parallel gradient exchange. ``write_trace`` needs nothing beyond the standard
library (open the file in https://ui.perfetto.dev or chrome://tracing); ``write_chart`` needs
matplotlib (``pip install "lightning-rannc[chart]"``).

The search counts the gradient exchange once, after the whole schedule, at the time of the
slowest stage's exchange (``predicted_exchange_ms``); both pictures draw it that way, so their
right edge is ``predicted_step_ms``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_rannc.errors import PlanError
from lightning_rannc.plan.plan import PartitionPlan, StagePlan
from lightning_rannc.plan.simulate import ScheduleTimes

__all__ = ["write_trace", "write_chart", "require_matplotlib"]

_KIND_NAMES = {"F": "forward", "B": "backward"}
_COLOURS = {"F": "#4c72b0", "B": "#dd8452", "exchange": "#8c8c8c", "update": "#55a868"}
_LABEL_POINTS = 7.0
"""Font size of the micro-batch numbers inside the boxes."""

Operation = tuple[str, int, float, float]


def write_trace(plan: PartitionPlan, times: ScheduleTimes, path: str | Path) -> None:
    """Write the simulated step as Chrome trace JSON: one thread (row) per stage, times in µs."""
    _check_times(plan, times)
    events: list[dict[str, Any]] = [_process_name(plan)]
    for stage, operations in zip(_row_stages(plan), times.operations):
        events += _thread_names(stage)
        events += [_operation_event(stage, op) for op in operations]
        if plan.predicted_exchange_ms > 0:
            events.append(_exchange_event(stage, times.makespan_ms, plan.predicted_exchange_ms))
        if plan.predicted_update_ms > 0:
            start_ms = times.makespan_ms + plan.predicted_exchange_ms
            events.append(_update_event(stage, start_ms, plan.predicted_update_ms))
    trace = {"traceEvents": events, "displayTimeUnit": "ms", "otherData": _trace_summary(plan, times)}
    Path(path).write_text(json.dumps(trace, indent=1))


def write_chart(plan: PartitionPlan, times: ScheduleTimes, path: str | Path, *, title: str | None = None) -> None:
    """Draw the simulated step as a Gantt chart (PNG, or any format matplotlib infers from ``path``).

    ``title`` (e.g. the model's name) goes before the layout line. Raises ``PlanError`` if
    matplotlib is not installed.
    """
    _check_times(plan, times)
    figure_cls, canvas_cls = require_matplotlib()
    figure = figure_cls(figsize=(12, 1.6 + 0.5 * plan.pipeline_degree), dpi=110, layout="constrained")
    canvas_cls(figure)
    axes = figure.add_subplot()
    _frame_axes(axes, plan, plan.predicted_step_ms)
    for row, operations in enumerate(times.operations):
        _draw_row(axes, row, operations)
    if plan.predicted_exchange_ms > 0:
        _draw_exchange(axes, plan.pipeline_degree, times.makespan_ms, plan.predicted_exchange_ms)
    if plan.predicted_update_ms > 0:
        start_ms = times.makespan_ms + plan.predicted_exchange_ms
        _draw_update(axes, plan.pipeline_degree, start_ms, plan.predicted_update_ms)
    _add_legend(axes, plan.predicted_exchange_ms > 0, plan.predicted_update_ms > 0)
    axes.set_title(_chart_title(plan, times, title), fontsize=10, loc="left")
    _label_boxes(figure, axes, times.operations)
    figure.savefig(str(path))


def require_matplotlib() -> tuple[Any, Any]:
    """matplotlib's ``Figure`` and Agg canvas classes (no pyplot, no global backend); ``PlanError`` if missing."""
    try:
        import matplotlib  # noqa: F401  (imported first so that a blocked or broken package fails here)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise PlanError(
            f'Charts need matplotlib ({error}): pip install "lightning-rannc[chart]" (or pip install matplotlib).'
        ) from error
    return Figure, FigureCanvasAgg


def _stage_label(stage: StagePlan) -> str:
    """``stage 0 (ranks [0, 2]) layers.0-5``: how both pictures name a stage's row."""
    return f"stage {stage.stage_index} (ranks {_ranks_text(stage.ranks)}) {stage.module_span}"


def _check_times(plan: PartitionPlan, times: ScheduleTimes) -> None:
    if len(times.operations) != plan.pipeline_degree:
        raise PlanError(
            f"The schedule times have {len(times.operations)} row(s) but the plan's pipelines have "
            f"{plan.pipeline_degree} rank(s); pass the times the plan was searched with (SearchResult.times)."
        )


def _row_stages(plan: PartitionPlan) -> list[StagePlan]:
    """The stage that names each row: one row per rank of a pipeline; with interleaved schedules
    the rank's first stage stands for all of its stages."""
    return plan.stages[: plan.pipeline_degree]


def _ranks_text(ranks: Sequence[int]) -> str:
    if len(ranks) <= 4:
        return str(list(ranks))
    return f"[{ranks[0]}, {ranks[1]}, ..., {ranks[-1]}] x{len(ranks)}"


# Chrome trace ---------------------------------------------------------------------------------


def _process_name(plan: PartitionPlan) -> dict[str, Any]:
    name = f"pipeline: {_layout_text(plan)}"
    return {"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": name}}


def _thread_names(stage: StagePlan) -> list[dict[str, Any]]:
    common = {"ph": "M", "pid": 0, "tid": stage.stage_index}
    return [
        {**common, "name": "thread_name", "args": {"name": _stage_label(stage)}},
        {**common, "name": "thread_sort_index", "args": {"sort_index": stage.stage_index}},
    ]


def _operation_event(stage: StagePlan, operation: Operation) -> dict[str, Any]:
    kind, microbatch, start_ms, end_ms = operation
    return {
        **_complete_event(f"{kind}{microbatch}", _KIND_NAMES[kind], stage.stage_index, start_ms, end_ms),
        "args": {"micro_batch": microbatch, "stage": stage.stage_index, "modules": stage.module_span},
    }


def _exchange_event(stage: StagePlan, start_ms: float, exchange_ms: float) -> dict[str, Any]:
    event = _complete_event("gradient exchange", "exchange", stage.stage_index, start_ms, start_ms + exchange_ms)
    args = {"stage": stage.stage_index, "ranks": stage.ranks, "note": "slowest stage's all-reduce, as predicted"}
    return {**event, "args": args}


def _update_event(stage: StagePlan, start_ms: float, update_ms: float) -> dict[str, Any]:
    event = _complete_event("optimizer step", "update", stage.stage_index, start_ms, start_ms + update_ms)
    return {**event, "args": {"stage": stage.stage_index, "note": "slowest stage's optimizer step and the loop's time"}}


def _complete_event(name: str, category: str, tid: int, start_ms: float, end_ms: float) -> dict[str, Any]:
    start_us, dur_us = round(start_ms * 1e3, 3), round((end_ms - start_ms) * 1e3, 3)
    return {"name": name, "cat": category, "ph": "X", "pid": 0, "tid": tid, "ts": start_us, "dur": dur_us}


def _trace_summary(plan: PartitionPlan, times: ScheduleTimes) -> dict[str, Any]:
    return {
        "layout": _layout_text(plan),
        "predicted_step_ms": plan.predicted_step_ms,
        "predicted_exchange_ms": plan.predicted_exchange_ms,
        "predicted_update_ms": plan.predicted_update_ms,
        "makespan_ms": times.makespan_ms,
        "bubble": times.bubble,
    }


def _layout_text(plan: PartitionPlan) -> str:
    return (
        f"{plan.num_stages} stage(s) x {plan.num_replicas} replica(s), {plan.num_microbatches} micro-batch(es) "
        f"of {plan.microbatch_size}, {plan.schedule}"
    )


# PNG chart ------------------------------------------------------------------------------------


def _frame_axes(axes: Any, plan: PartitionPlan, end_ms: float) -> None:
    axes.set_xlim(0, end_ms * 1.01 if end_ms > 0 else 1.0)
    axes.set_ylim(plan.pipeline_degree - 0.5, -0.5)  # stage 0 on top
    axes.set_yticks(range(plan.pipeline_degree), [_tick_label(plan, s) for s in _row_stages(plan)], fontsize=8)
    axes.set_xlabel("time in the step (ms, simulated)")
    axes.xaxis.set_major_formatter("{x:,.0f}")
    axes.grid(axis="x", alpha=0.3)
    axes.set_axisbelow(True)


def _tick_label(plan: PartitionPlan, stage: StagePlan) -> str:
    span = stage.module_span if len(stage.module_span) <= 36 else stage.module_span[:33] + "..."
    extra = ", recomputed" if stage.checkpoint else ""
    others = [s.stage_index for s in plan.stages[stage.stage_index + plan.pipeline_degree :: plan.pipeline_degree]]
    name = f"stage {stage.stage_index}" + "".join(f"+{k}" for k in others)
    return f"{name} (ranks {_ranks_text(stage.ranks)}{extra})\n{span}"


def _draw_row(axes: Any, row: int, operations: Sequence[Operation]) -> None:
    for kind in ("F", "B"):
        spans = [(start, end - start) for k, _, start, end in operations if k == kind]
        axes.broken_barh(spans, (row - 0.38, 0.76), facecolors=_COLOURS[kind], edgecolor="white", linewidth=0.5)


def _label_boxes(figure: Any, axes: Any, operations: Sequence[Sequence[Operation]]) -> None:
    """Micro-batch numbers in the boxes wide enough for them, measured once the layout is final."""
    figure.draw_without_rendering()
    axes_inches = axes.get_window_extent().width / figure.dpi
    low, high = axes.get_xlim()
    ms_per_digit = 0.62 * _LABEL_POINTS / 72 / axes_inches * (high - low)
    for row, stage_operations in enumerate(operations):
        for _, microbatch, start, end in stage_operations:
            if end - start >= (len(str(microbatch)) + 1) * ms_per_digit:
                axes.text((start + end) / 2, row, str(microbatch), ha="center", va="center", fontsize=_LABEL_POINTS)


def _draw_exchange(axes: Any, num_stages: int, start_ms: float, exchange_ms: float) -> None:
    for row in range(num_stages):
        axes.broken_barh(
            [(start_ms, exchange_ms)], (row - 0.38, 0.76), facecolors=_COLOURS["exchange"], hatch="//", alpha=0.6
        )
    axes.axvline(start_ms, color="black", linewidth=0.8, linestyle="--")


def _draw_update(axes: Any, num_stages: int, start_ms: float, update_ms: float) -> None:
    for row in range(num_stages):
        axes.broken_barh([(start_ms, update_ms)], (row - 0.38, 0.76), facecolors=_COLOURS["update"], alpha=0.6)


def _add_legend(axes: Any, with_exchange: bool, with_update: bool) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=_COLOURS["F"], label="forward"), Patch(color=_COLOURS["B"], label="backward")]
    if with_exchange:
        handles.append(Patch(facecolor=_COLOURS["exchange"], hatch="//", alpha=0.6, label="gradient exchange"))
    if with_update:
        handles.append(Patch(facecolor=_COLOURS["update"], alpha=0.6, label="optimizer step, loop"))
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)


def _chart_title(plan: PartitionPlan, times: ScheduleTimes, title: str | None) -> str:
    layout = f"{title}: {_layout_text(plan)}" if title else _layout_text(plan)
    step = f"predicted step {plan.predicted_step_ms:,.1f} ms"
    parts = [("gradient exchange", plan.predicted_exchange_ms), ("optimizer step, loop", plan.predicted_update_ms)]
    shown = [f" + {name} {ms:,.1f}" for name, ms in parts if ms > 0]
    if shown:
        step += f" = schedule {times.makespan_ms:,.1f}" + "".join(shown)
    return f"{layout}\n{step}; bubble {times.bubble:.0%}"
