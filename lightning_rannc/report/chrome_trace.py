"""Chrome trace files (https://ui.perfetto.dev, chrome://tracing): their events, and a planned step as one.

Two traces share this format: the predicted step (``write_trace``: one thread per stage, the
simulated schedule ``ScheduleTimes.operations`` the prediction came from, then the gradient
exchange and the optimizer step) and what each rank really did (``runtime/trace.py``). Both build
their events with the helpers here, so the fields ``measured.read_measured_step`` reads back are
spelled in one place. Only the standard library is needed.

The search counts the gradient exchange once, after the whole schedule, at the time of the
slowest stage's exchange (``predicted_exchange_ms``); the trace draws it that way, so its right
edge is ``predicted_step_ms``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning_rannc.plan.plan import PartitionPlan, StagePlan
from lightning_rannc.plan.simulate import ScheduleTimes
from lightning_rannc.report.labels import Operation, check_times, layout_text, ranks_text, row_stages

__all__ = [
    "complete_event",
    "process_name_event",
    "thread_name_event",
    "thread_sort_event",
    "write_chrome_trace",
    "write_trace",
]

_KIND_NAMES = {"F": "forward", "B": "backward", "I": "backward (input gradients)", "W": "backward (weight gradients)"}


def complete_event(
    name: str,
    category: str,
    *,
    pid: int,
    tid: int,
    start_us: float,
    duration_us: float,
    args: dict[str, Any],
    decimals: int = 3,
) -> dict[str, Any]:
    """A complete event (``"ph": "X"``): one box on thread ``tid`` of process ``pid``.

    Args:
        name: the box's label (``F3``, ``gradient exchange``).
        category: its ``cat`` (``forward``, ``communication``, ...), which picks its colour.
        pid: the process (row group): a rank, or 0 for a predicted step.
        tid: the thread (row) within the process.
        start_us: start in microseconds from the trace's origin.
        duration_us: length in microseconds.
        args: what the viewer shows for the box (``step``, ``micro_batch``, ...).
        decimals: digits kept of a microsecond (fewer keep a long runtime trace small).
    """
    return {
        "name": name,
        "cat": category,
        "ph": "X",
        "pid": pid,
        "tid": tid,
        "ts": round(start_us, decimals),
        "dur": round(duration_us, decimals),
        "args": args,
    }


def process_name_event(pid: int, name: str, clock: int | None = None) -> dict[str, Any]:
    """Metadata naming process ``pid`` (a rank, or the predicted pipeline). ``clock``: which
    clock a rank's times are on (ranks of one clock line up exactly; viewers ignore it)."""
    return _metadata_event("process_name", pid, 0, {"name": name} | ({} if clock is None else {"clock": clock}))


def thread_name_event(pid: int, tid: int, name: str) -> dict[str, Any]:
    """Metadata naming thread ``tid`` of process ``pid`` (a stage, or what runs on a rank)."""
    return _metadata_event("thread_name", pid, tid, {"name": name})


def thread_sort_event(pid: int, tid: int, index: int) -> dict[str, Any]:
    """Metadata placing thread ``tid`` of process ``pid`` at ``index`` among its threads."""
    return _metadata_event("thread_sort_index", pid, tid, {"sort_index": index})


def write_chrome_trace(
    path: str | Path,
    events: Iterable[Mapping[str, Any]],
    *,
    other_data: Mapping[str, Any] | None = None,
    indent: int | None = None,
) -> None:
    """Write ``{"traceEvents": events, "displayTimeUnit": "ms"}`` (and ``otherData`` if given) as JSON."""
    trace: dict[str, Any] = {"traceEvents": list(events), "displayTimeUnit": "ms"}
    if other_data is not None:
        trace["otherData"] = dict(other_data)
    Path(path).write_text(json.dumps(trace, indent=indent))


def write_trace(plan: PartitionPlan, times: ScheduleTimes, path: str | Path) -> None:
    """Write the simulated step as Chrome trace JSON: one thread (row) per stage, times in microseconds."""
    check_times(plan, times)
    events: list[dict[str, Any]] = [process_name_event(0, f"pipeline: {layout_text(plan)}")]
    for stage, operations in zip(row_stages(plan), times.operations):
        events += [
            thread_name_event(0, stage.stage_index, _stage_label(stage)),
            thread_sort_event(0, stage.stage_index, stage.stage_index),
        ]
        events += [_operation_event(stage, op) for op in operations]
        if plan.predicted_exchange_ms > 0:
            events.append(_exchange_event(stage, times.makespan_ms, plan.predicted_exchange_ms))
        if plan.predicted_update_ms > 0:
            start_ms = times.makespan_ms + plan.predicted_exchange_ms
            events.append(_update_event(stage, start_ms, plan.predicted_update_ms))
    write_chrome_trace(path, events, other_data=_trace_summary(plan, times), indent=1)


def _metadata_event(name: str, pid: int, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": args}


def _stage_label(stage: StagePlan) -> str:
    """``stage 0 (ranks [0, 2]) layers.0-5``: how the trace names a stage's row."""
    return f"stage {stage.stage_index} (ranks {ranks_text(stage.ranks)}) {stage.module_span}"


def _operation_event(stage: StagePlan, operation: Operation) -> dict[str, Any]:
    kind, microbatch, start_ms, end_ms = operation
    args = {"micro_batch": microbatch, "stage": stage.stage_index, "modules": stage.module_span}
    return _predicted_event(f"{kind}{microbatch}", _KIND_NAMES[kind], stage, start_ms, end_ms, args)


def _exchange_event(stage: StagePlan, start_ms: float, exchange_ms: float) -> dict[str, Any]:
    args = {"stage": stage.stage_index, "ranks": stage.ranks, "note": "slowest stage's all-reduce, as predicted"}
    return _predicted_event("gradient exchange", "exchange", stage, start_ms, start_ms + exchange_ms, args)


def _update_event(stage: StagePlan, start_ms: float, update_ms: float) -> dict[str, Any]:
    args = {"stage": stage.stage_index, "note": "slowest stage's optimizer step and the loop's time"}
    return _predicted_event("optimizer step", "update", stage, start_ms, start_ms + update_ms, args)


def _predicted_event(
    name: str, category: str, stage: StagePlan, start_ms: float, end_ms: float, args: dict[str, Any]
) -> dict[str, Any]:
    """A box on the stage's row of the predicted pipeline (process 0), from times in ms."""
    return complete_event(
        name,
        category,
        pid=0,
        tid=stage.stage_index,
        start_us=start_ms * 1e3,
        duration_us=(end_ms - start_ms) * 1e3,
        args=args,
    )


def _trace_summary(plan: PartitionPlan, times: ScheduleTimes) -> dict[str, Any]:
    return {
        "layout": layout_text(plan),
        "predicted_step_ms": plan.predicted_step_ms,
        "predicted_exchange_ms": plan.predicted_exchange_ms,
        "predicted_update_ms": plan.predicted_update_ms,
        "makespan_ms": times.makespan_ms,
        "bubble": times.bubble,
    }
