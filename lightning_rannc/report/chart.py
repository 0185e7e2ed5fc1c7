"""Gantt charts of a planned pipeline step, and of the prediction above a measured step (matplotlib).

The plan table gives one number for the step and one for the bubble; it does not show *where*
the stages wait. ``write_chart`` draws the simulated schedule (``ScheduleTimes.operations``) that
the prediction came from: one row per stage, a box per forward and backward of each micro-batch,
then the data-parallel gradient exchange. It needs matplotlib (``pip install
"lightning-rannc[chart]"``); the same step as a Chrome trace is ``chrome_trace.write_trace``.

The search counts the gradient exchange once, after the whole schedule, at the time of the
slowest stage's exchange (``predicted_exchange_ms``); the chart draws it that way, so its right
edge is ``predicted_step_ms``.

``write_comparison_chart`` puts the prediction above what really happened: one training step
of the runtime trace (``RaNNCStrategy(trace=...)``, ``runtime/trace.py``, read by
``measured.read_measured_step``), one row per rank, in the same colours, with the time spent
waiting for sends and receives in a colour of its own. Each panel has its own time axis,
starting at 0 at the step's first event.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_rannc.errors import PlanError
from lightning_rannc.plan.plan import PartitionPlan, StagePlan
from lightning_rannc.plan.simulate import ScheduleTimes
from lightning_rannc.report.labels import Operation, check_times, layout_text, ranks_text, row_stages
from lightning_rannc.report.measured import (
    MEASURED_KINDS,
    MeasuredEvent,
    MeasuredStep,
    check_measured,
    read_measured_step,
    steps_text,
)

__all__ = ["write_chart", "write_comparison_chart", "require_matplotlib"]

_COLOURS = {"F": "#4c72b0", "B": "#dd8452", "exchange": "#8c8c8c", "update": "#55a868", "p2p": "#c44e52"}
_STYLES: dict[str, dict[str, Any]] = {
    "F": {"facecolor": _COLOURS["F"], "edgecolor": "white", "linewidth": 0.5},
    "B": {"facecolor": _COLOURS["B"], "edgecolor": "white", "linewidth": 0.5},
    "exchange": {"facecolor": _COLOURS["exchange"], "hatch": "//", "alpha": 0.6},
    "update": {"facecolor": _COLOURS["update"], "alpha": 0.6},
    "p2p": {"facecolor": _COLOURS["p2p"], "alpha": 0.8},
}
"""How each kind of box is drawn (``broken_barh``) and shown in the legend (``Patch``)."""
_PREDICTED_LEGEND = {"F": "forward", "B": "backward", "exchange": "gradient exchange", "update": "optimizer step, loop"}
_MEASURED_LEGEND = {
    "F": "forward",
    "B": "backward",
    "p2p": "send/recv (waiting)",
    "exchange": "collectives (gradients, loss)",
    "update": "optimizer step",
}
_LABEL_POINTS = 7.0
"""Font size of the micro-batch numbers inside the boxes."""


def write_chart(plan: PartitionPlan, times: ScheduleTimes, path: str | Path, *, title: str | None = None) -> None:
    """Draw the simulated step as a Gantt chart (PNG, or any format matplotlib infers from ``path``).

    ``title`` (e.g. the model's name) goes before the layout line. Raises ``PlanError`` if
    matplotlib is not installed.
    """
    check_times(plan, times)
    figure = _new_figure(1.6 + 0.5 * plan.pipeline_stages)
    _draw_predicted(figure, figure.add_subplot(), plan, times, _chart_title(plan, times, title))
    figure.savefig(str(path))


def write_comparison_chart(
    plan: PartitionPlan,
    times: ScheduleTimes,
    trace: str | Path | Mapping[str, Any] | Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    step: int | None = None,
    title: str | None = None,
) -> MeasuredStep:
    """Draw the predicted step (top) above a measured one (bottom) in one PNG.

    ``trace`` is the runtime trace ``RaNNCStrategy(trace=...)`` wrote (a path, its JSON object or
    its ``traceEvents``) for a run of ``plan`` (``RaNNCStrategy(deployment=...)`` saves it);
    ``step`` is the training step to draw, by default the last recorded one (the first includes
    warm-up). Returns the measured step. Raises ``PlanError`` if matplotlib is missing, the trace
    holds no such step, or it was recorded on another number of ranks than the plan's.

    Example::

        plan = PartitionPlan.load("plan.json")
        write_comparison_chart(plan, simulate_plan(plan), "trace.json", "step.png")
    """
    check_times(plan, times)
    measured = read_measured_step(trace, step)
    check_measured(plan, measured)
    figure = _new_figure(3.2 + 0.5 * (plan.pipeline_stages + len(measured.rows)))
    top, bottom = figure.subplots(2, 1, height_ratios=[plan.pipeline_stages + 1.5, len(measured.rows) + 1.5])
    _draw_predicted(figure, top, plan, times, "predicted: " + _chart_title(plan, times, title))
    _draw_measured(figure, bottom, measured, plan)
    figure.savefig(str(path))
    return measured


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


def _new_figure(height: float) -> Any:
    figure_cls, canvas_cls = require_matplotlib()
    figure = figure_cls(figsize=(12, height), dpi=110, layout="constrained")
    canvas_cls(figure)
    return figure


def _draw_predicted(figure: Any, axes: Any, plan: PartitionPlan, times: ScheduleTimes, title: str) -> None:
    _frame_axes(axes, [_tick_label(plan, s) for s in row_stages(plan)], plan.predicted_step_ms, "simulated")
    for row, operations in enumerate(times.operations):
        _draw_row(axes, row, operations)
    if plan.predicted_exchange_ms > 0:
        _draw_exchange(axes, plan.pipeline_stages, times.makespan_ms, plan.predicted_exchange_ms)
    if plan.predicted_update_ms > 0:
        start_ms = times.makespan_ms + plan.predicted_exchange_ms
        _draw_update(axes, plan.pipeline_stages, start_ms, plan.predicted_update_ms)
    shown = {"exchange": plan.predicted_exchange_ms > 0, "update": plan.predicted_update_ms > 0}
    _add_legend(axes, _PREDICTED_LEGEND, [kind for kind in _PREDICTED_LEGEND if shown.get(kind, True)])
    axes.set_title(title, fontsize=10, loc="left")
    _label_boxes(figure, axes, times.operations)


def _draw_measured(figure: Any, axes: Any, measured: MeasuredStep, plan: PartitionPlan) -> None:
    """One row per rank: every event of the step, as the box of its category."""
    ranks = list(measured.rows)
    _frame_axes(axes, [_rank_label(measured.rows[rank], rank) for rank in ranks], measured.duration_ms, "measured")
    for row, rank in enumerate(ranks):
        for kind in _MEASURED_LEGEND:
            spans = [(e.start_ms, e.end_ms - e.start_ms) for e in measured.rows[rank] if _measured_kind(e) == kind]
            _draw_spans(axes, row, spans, kind)
    present = {_measured_kind(e) for events in measured.rows.values() for e in events}
    _add_legend(axes, _MEASURED_LEGEND, [kind for kind in _MEASURED_LEGEND if kind in present])
    axes.set_title(_measured_title(measured, plan), fontsize=10, loc="left")
    _label_boxes(figure, axes, [measured.operations(rank) for rank in ranks])


def _measured_kind(event: MeasuredEvent) -> str | None:
    return MEASURED_KINDS.get(event.category)


def _rank_label(events: Sequence[MeasuredEvent], rank: int) -> str:
    stages = sorted({int(e.args["stage"]) for e in events if e.category in ("forward", "backward")})
    return f"rank {rank}" + (f"\nstage {'+'.join(map(str, stages))}" if stages else "")


def _measured_title(measured: MeasuredStep, plan: PartitionPlan) -> str:
    duration = measured.duration_ms
    ratio = f", {duration / plan.predicted_step_ms:.2f}x the prediction" if plan.predicted_step_ms > 0 else ""
    waits = max((_total_ms(events, "communication") for events in measured.rows.values()), default=0.0)
    return (
        f"measured: training step {measured.step} (steps {steps_text(measured.steps)} recorded), first to last "
        f"event {duration:,.1f} ms{ratio}\nwaiting on send/recv: up to {waits:,.1f} ms per rank"
    )


def _total_ms(events: Sequence[MeasuredEvent], category: str) -> float:
    return sum(e.end_ms - e.start_ms for e in events if e.category == category)


def _frame_axes(axes: Any, tick_labels: Sequence[str], end_ms: float, clock: str) -> None:
    axes.set_xlim(0, end_ms * 1.01 if end_ms > 0 else 1.0)
    axes.set_ylim(len(tick_labels) - 0.5, -0.5)  # stage 0 / rank 0 on top
    axes.set_yticks(range(len(tick_labels)), tick_labels, fontsize=8)
    axes.set_xlabel(f"time in the step (ms, {clock})")
    axes.xaxis.set_major_formatter("{x:,.0f}")
    axes.grid(axis="x", alpha=0.3)
    axes.set_axisbelow(True)


def _tick_label(plan: PartitionPlan, stage: StagePlan) -> str:
    span = stage.module_span if len(stage.module_span) <= 36 else stage.module_span[:33] + "..."
    extra = (
        ", recomputed" if stage.checkpoint else f", {stage.recompute_span} recomputed" if stage.recompute_end else ""
    )
    position = plan.position_of(stage.stage_index)
    later = plan.stages[stage.stage_index + 1 :]
    others = [s.stage_index for s in later if plan.position_of(s.stage_index) == position]
    name = f"stage {stage.stage_index}" + "".join(f"+{k}" for k in others)
    return f"{name} (ranks {ranks_text(stage.ranks)}{extra})\n{span}"


def _draw_row(axes: Any, row: int, operations: Sequence[Operation]) -> None:
    for kind in ("F", "B"):  # a zero-bubble backward's input ("I") and weight ("W") passes as backward
        spans = [(start, end - start) for k, _, start, end in operations if ("B" if k in ("I", "W") else k) == kind]
        _draw_spans(axes, row, spans, kind)


def _draw_spans(axes: Any, row: int, spans: Sequence[tuple[float, float]], kind: str) -> None:
    """Boxes ``(start_ms, duration_ms)`` on ``row``, drawn as ``kind`` (see ``_STYLES``)."""
    if spans:
        axes.broken_barh(list(spans), (row - 0.38, 0.76), **_STYLES[kind])


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
        _draw_spans(axes, row, [(start_ms, exchange_ms)], "exchange")
    axes.axvline(start_ms, color="black", linewidth=0.8, linestyle="--")


def _draw_update(axes: Any, num_stages: int, start_ms: float, update_ms: float) -> None:
    for row in range(num_stages):
        _draw_spans(axes, row, [(start_ms, update_ms)], "update")


def _add_legend(axes: Any, labels: Mapping[str, str], kinds: Sequence[str]) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(label=labels[kind], **_STYLES[kind]) for kind in kinds]
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)


def _chart_title(plan: PartitionPlan, times: ScheduleTimes, title: str | None) -> str:
    layout = f"{title}: {layout_text(plan)}" if title else layout_text(plan)
    step = f"predicted step {plan.predicted_step_ms:,.1f} ms"
    parts = [("gradient exchange", plan.predicted_exchange_ms), ("optimizer step, loop", plan.predicted_update_ms)]
    shown = [f" + {name} {ms:,.1f}" for name, ms in parts if ms > 0]
    if shown:
        step += f" = schedule {times.makespan_ms:,.1f}" + "".join(shown)
    return f"{layout}\n{step}; bubble {times.bubble:.0%}"
