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

``write_comparison_chart`` puts the prediction above what really happened: one training step
of the runtime trace (``RaNNCStrategy(trace=...)``, ``runtime/trace.py``), one row per rank, in
the same colours, with the time spent waiting for sends and receives in a colour of its own.
Each panel has its own time axis, starting at 0 at the step's first event.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from lightning_rannc.errors import PlanError
from lightning_rannc.plan.plan import PartitionPlan, StagePlan
from lightning_rannc.plan.simulate import ScheduleTimes

__all__ = [
    "write_trace",
    "write_chart",
    "write_comparison_chart",
    "read_measured_step",
    "MeasuredEvent",
    "MeasuredStep",
    "require_matplotlib",
]

_KIND_NAMES = {"F": "forward", "B": "backward"}
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
_MEASURED_KINDS = {
    "forward": "F",
    "backward": "B",
    "communication": "p2p",
    "collective": "exchange",
    "optimizer": "update",
}
"""Runtime trace category -> the kind of box it is drawn as."""
_LABEL_POINTS = 7.0
"""Font size of the micro-batch numbers inside the boxes."""

Operation = tuple[str, int, float, float]


class MeasuredEvent(NamedTuple):
    """One event of a runtime trace, in ms from the start of its step."""

    name: str
    """``F3``, ``B2``, ``send F1 + recv B0``, ``gradient average over replicas``, ..."""
    category: str
    """``forward``, ``backward``, ``communication``, ``collective`` or ``optimizer``."""
    start_ms: float
    end_ms: float
    args: dict[str, Any]


@dataclass(frozen=True)
class MeasuredStep:
    """One training step of a runtime trace (``RaNNCStrategy(trace=...)``)."""

    step: int
    steps: list[int]
    """Every step the trace recorded."""
    rows: dict[int, list[MeasuredEvent]]
    """Per rank, its events of ``step`` in time order; time 0 is the step's first event on any rank."""

    @property
    def duration_ms(self) -> float:
        """From the step's first event to its last, over all ranks."""
        return max((e.end_ms for events in self.rows.values() for e in events), default=0.0)

    def operations(self, rank: int) -> list[Operation]:
        """The rank's forwards and backwards as ``(kind, micro_batch, start_ms, end_ms)``."""
        return [
            (_MEASURED_KINDS[e.category], int(e.args["micro_batch"]), e.start_ms, e.end_ms)
            for e in self.rows[rank]
            if e.category in ("forward", "backward")
        ]


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
    figure = _new_figure(1.6 + 0.5 * plan.pipeline_degree)
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
    _check_times(plan, times)
    measured = read_measured_step(trace, step)
    _check_measured(plan, measured)
    figure = _new_figure(3.2 + 0.5 * (plan.pipeline_degree + len(measured.rows)))
    top, bottom = figure.subplots(2, 1, height_ratios=[plan.pipeline_degree + 1.5, len(measured.rows) + 1.5])
    _draw_predicted(figure, top, plan, times, "predicted: " + _chart_title(plan, times, title))
    _draw_measured(figure, bottom, measured, plan)
    figure.savefig(str(path))
    return measured


def read_measured_step(
    trace: str | Path | Mapping[str, Any] | Sequence[Mapping[str, Any]], step: int | None = None
) -> MeasuredStep:
    """One training step of a runtime trace (see ``write_comparison_chart``); the last recorded
    one when ``step`` is None. Raises ``PlanError`` for a file that is not a runtime trace or a
    step it did not record."""
    source = f"The trace {str(trace)!r}" if isinstance(trace, (str, Path)) else "The trace"
    events = _trace_events(trace, source)
    timed = [e for e in events if e.get("ph") == "X" and "step" in (e.get("args") or {})]
    steps = sorted({int(e["args"]["step"]) for e in timed})
    if not steps:
        raise PlanError(
            f"{source} holds no training step: pass the file RaNNCStrategy(trace=...) wrote (the CLI's "
            "`plan --trace` writes the predicted schedule, which has none)."
        )
    step = steps[-1] if step is None else step
    if step not in steps:
        raise PlanError(f"{source} recorded steps {_steps_text(steps)}, not step {step}: pick one of them.")
    mine = [e for e in timed if e["args"]["step"] == step]
    origin = min(float(e["ts"]) for e in mine)
    ranks = {int(e["pid"]) for e in events if e.get("name") == "process_name"} | {int(e["pid"]) for e in mine}
    rows: dict[int, list[MeasuredEvent]] = {rank: [] for rank in sorted(ranks)}
    for e in sorted(mine, key=lambda e: float(e["ts"])):
        start_ms = (float(e["ts"]) - origin) / 1e3
        rows[int(e["pid"])].append(
            MeasuredEvent(e["name"], e.get("cat", ""), start_ms, start_ms + float(e["dur"]) / 1e3, e["args"])
        )
    return MeasuredStep(step=step, steps=steps, rows=rows)


def _trace_events(
    trace: str | Path | Mapping[str, Any] | Sequence[Mapping[str, Any]], source: str
) -> list[Mapping[str, Any]]:
    try:
        data: Any = json.loads(Path(trace).read_text()) if isinstance(trace, (str, Path)) else trace
        events = data["traceEvents"] if isinstance(data, Mapping) else data
        if not all(isinstance(e, Mapping) for e in events):
            raise TypeError("its events are not JSON objects")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PlanError(
            f"{source} is not a Chrome trace ({type(error).__name__}: {error}); pass the file "
            "RaNNCStrategy(trace=...) wrote."
        ) from error
    return list(events)


def _check_measured(plan: PartitionPlan, measured: MeasuredStep) -> None:
    if len(measured.rows) != plan.world_size:
        raise PlanError(
            f"The trace was recorded on {len(measured.rows)} rank(s) but the plan is for {plan.world_size} "
            "device(s): compare a run with the plan it used (RaNNCStrategy(deployment='plan.json') saves it)."
        )


def _steps_text(steps: Sequence[int]) -> str:
    return f"{steps[0]}-{steps[-1]}" if list(steps) == list(range(steps[0], steps[-1] + 1)) else str(list(steps))


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


def _new_figure(height: float) -> Any:
    figure_cls, canvas_cls = require_matplotlib()
    figure = figure_cls(figsize=(12, height), dpi=110, layout="constrained")
    canvas_cls(figure)
    return figure


def _draw_predicted(figure: Any, axes: Any, plan: PartitionPlan, times: ScheduleTimes, title: str) -> None:
    _frame_axes(axes, [_tick_label(plan, s) for s in _row_stages(plan)], plan.predicted_step_ms, "simulated")
    for row, operations in enumerate(times.operations):
        _draw_row(axes, row, operations)
    if plan.predicted_exchange_ms > 0:
        _draw_exchange(axes, plan.pipeline_degree, times.makespan_ms, plan.predicted_exchange_ms)
    if plan.predicted_update_ms > 0:
        start_ms = times.makespan_ms + plan.predicted_exchange_ms
        _draw_update(axes, plan.pipeline_degree, start_ms, plan.predicted_update_ms)
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
    return _MEASURED_KINDS.get(event.category)


def _rank_label(events: Sequence[MeasuredEvent], rank: int) -> str:
    stages = sorted({int(e.args["stage"]) for e in events if e.category in ("forward", "backward")})
    return f"rank {rank}" + (f"\nstage {'+'.join(map(str, stages))}" if stages else "")


def _measured_title(measured: MeasuredStep, plan: PartitionPlan) -> str:
    duration = measured.duration_ms
    ratio = f", {duration / plan.predicted_step_ms:.2f}x the prediction" if plan.predicted_step_ms > 0 else ""
    waits = max((_total_ms(events, "communication") for events in measured.rows.values()), default=0.0)
    return (
        f"measured: training step {measured.step} (steps {_steps_text(measured.steps)} recorded), first to last "
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
    extra = ", recomputed" if stage.checkpoint else ""
    others = [s.stage_index for s in plan.stages[stage.stage_index + plan.pipeline_degree :: plan.pipeline_degree]]
    name = f"stage {stage.stage_index}" + "".join(f"+{k}" for k in others)
    return f"{name} (ranks {_ranks_text(stage.ranks)}{extra})\n{span}"


def _draw_row(axes: Any, row: int, operations: Sequence[Operation]) -> None:
    for kind in ("F", "B"):
        _draw_spans(axes, row, [(start, end - start) for k, _, start, end in operations if k == kind], kind)


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
    layout = f"{title}: {_layout_text(plan)}" if title else _layout_text(plan)
    step = f"predicted step {plan.predicted_step_ms:,.1f} ms"
    parts = [("gradient exchange", plan.predicted_exchange_ms), ("optimizer step, loop", plan.predicted_update_ms)]
    shown = [f" + {name} {ms:,.1f}" for name, ms in parts if ms > 0]
    if shown:
        step += f" = schedule {times.makespan_ms:,.1f}" + "".join(shown)
    return f"{layout}\n{step}; bubble {times.bubble:.0%}"
