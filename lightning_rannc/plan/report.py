"""A plan as a table (``python -m lightning_rannc plan`` / ``show``, and the strategy's log).

``format_plan`` is plain text. The CLI prints the same rows with rich (``print_rich_plan``) in a
terminal or with ``--rich``, when rich is installed (it is optional: ``pip install rich``); the
strategy logs ``plan_lines``: rich's table when its log goes to a terminal, else plain text (log
files and CI output stay greppable).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO, Any

from lightning_rannc.plan.plan import PartitionPlan, StagePlan
from lightning_rannc.plan.search import Candidate

__all__ = ["format_plan", "plan_lines", "print_rich_plan", "rich_plan_table", "techniques"]

_MEMORY_KINDS = {"params": "param", "grads": "grads", "optimizer": "optim", "activations": "activ", "buffers": "comm"}
_MEMORY_KINDS["total"] = "total"


_MODULES_COLUMN = 2
"""Left-aligned (the other columns are numbers, right-aligned)."""
_RICH_WIDTH = 200
"""Columns rich may use when the output is not a terminal (a file or a pipe), so rows do not wrap."""


def format_plan(plan: PartitionPlan) -> str:
    """Per stage: ranks, module span, parameters, times, memory; then the step prediction."""
    return "\n".join([_summary(plan), *_table(_rows(plan)), *_footer(plan)])


def plan_lines(plan: PartitionPlan, rich: bool, width: int | None = None) -> list[str]:
    """``format_plan``'s lines, the table drawn by rich (``width`` columns at most) when
    ``rich`` and rich is installed."""
    if rich:
        import io

        text = io.StringIO()
        if print_rich_plan(plan, file=text, width=width):
            return text.getvalue().rstrip("\n").splitlines()
    return format_plan(plan).splitlines()


def print_rich_plan(plan: PartitionPlan, file: IO[str] | None = None, width: int | None = None) -> bool:
    """Print ``format_plan``'s lines with the table drawn by rich; False (and nothing printed)
    when rich is not installed."""
    try:
        from rich.console import Console
    except ImportError:
        return False
    console = Console(file=file, highlight=False, width=width)
    if width is None and not console.is_terminal:
        console.width = max(console.width, _RICH_WIDTH)
    console.print(_summary(plan), markup=False)
    console.print(rich_plan_table(plan))
    for line in _footer(plan):
        console.print(line, markup=False)
    return True


def rich_plan_table(plan: PartitionPlan) -> Any:
    """``format_plan``'s table as a ``rich.table.Table`` (needs rich)."""
    from rich.table import Table
    from rich.text import Text

    header, *rows = _rows(plan)
    table = Table()
    for column, name in enumerate(header):
        table.add_column(name, justify="left" if column == _MODULES_COLUMN else "right")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))  # Text: module names are not rich markup
    return table


def _rows(plan: PartitionPlan) -> list[list[str]]:
    """The header, then one row per stage."""
    header = ["stage", "ranks", "modules", "params", "fwd ms", "bwd ms", "ckpt"]
    has_memory = all(s.memory for s in plan.stages)
    unit, scale = _memory_unit(plan) if has_memory else ("GiB", 2**30)
    if has_memory:
        header += [f"{label} {unit}" for label in _MEMORY_KINDS.values()]
    rows = [header]
    for stage in plan.stages:
        row = [
            str(stage.stage_index),
            _ranks(stage.ranks),
            stage.module_span,
            _count(stage.num_params),
            f"{stage.fwd_ms:.2f}",
            f"{stage.bwd_ms:.2f}",
            _recomputed(stage),
        ]
        if has_memory:
            row += [f"{stage.memory.get(k, 0) / scale:.2f}" for k in _MEMORY_KINDS]
        rows.append(row)
    return rows


def _recomputed(stage: StagePlan) -> str:
    """The "ckpt" column: the whole stage, its first layers (selective checkpointing), or none."""
    if stage.checkpoint:
        return "yes"
    return stage.recompute_span or "part" if stage.recompute_end is not None else "no"


def _memory_unit(plan: PartitionPlan) -> tuple[str, int]:
    """GiB, or MiB when no stage needs a GiB (a small model's table would read 0.00 throughout)."""
    largest = max(s.memory.get("total", 0) for s in plan.stages)
    return ("GiB", 2**30) if largest >= 2**30 else ("MiB", 2**20)


def _summary(plan: PartitionPlan) -> str:
    return (
        f"{plan.world_size} device(s): {plan.pipeline_stages} stage(s) x {plan.num_replicas} replica(s), "
        f"{plan.num_microbatches} micro-batch(es) of {plan.microbatch_size}, schedule {plan.schedule}"
        + (" (zero bubble)" if plan.zero_bubble else "")
        + (f", optimizer state ZeRO-{plan.zero_stage}" if plan.num_replicas > 1 else "")
        + (", optimizer offloaded to the host" if plan.offload_optimizer else "")
    )


def _footer(plan: PartitionPlan) -> list[str]:
    batch = plan.microbatch_size * plan.num_microbatches * plan.num_replicas
    lines = [f"predicted step {plan.predicted_step_ms:.1f} ms"]
    if plan.predicted_step_ms > 0:
        lines[0] += f" ({batch / plan.predicted_step_ms * 1e3:,.1f} samples/s for batches of {batch})"
    lines.append(
        f"pipeline bubble {plan.predicted_bubble:.1%}; gradient exchange {plan.predicted_exchange_ms:.1f} ms per step "
        "after the schedule"
    )
    lines.append("techniques: " + techniques(plan))
    shared = max((s.memory.get("shared", 0) for s in plan.stages), default=0)
    if shared > 0:
        unit, scale = _memory_unit(plan)
        lines.append(
            f"total counts once what grads and activ share (up to {shared / scale:.2f} {unit} a stage): "
            "gradients made while backward frees activations, or after them (the optimizer step)"
        )
    return lines


def techniques(plan: PartitionPlan) -> str:
    """The memory and schedule techniques the plan uses, in one line."""
    interleaved = f"interleaved 1F1B, {plan.virtual_stages} stages a rank"
    names = {"gpipe": "GPipe", "1f1b": "1F1B", "zbv": "ZB-V, 2 stages a rank in a V"}
    schedule = names.get(plan.schedule, interleaved)
    parts = [schedule + (" as zero bubble" if plan.zero_bubble and plan.schedule != "zbv" else "")]
    if plan.num_replicas > 1:
        parts.append(f"ZeRO-{plan.zero_stage}")
    whole = sum(s.checkpoint for s in plan.stages)
    first_layers = sum(s.recompute_end is not None for s in plan.stages)
    if whole or first_layers:
        parts.append(f"activation checkpointing: {whole} stage(s) whole, {first_layers} their first layers only")
    if plan.offload_optimizer:
        parts.append("optimizer state and step on the host")
    return ", ".join(parts)


def microbatch_choice(plan: PartitionPlan, candidates: Sequence[Candidate]) -> str | None:
    """Why the plan has its micro-batch count: the predicted steps of the other counts the search
    compared for the same layout; ``None`` when it compared no other."""
    others: dict[int, float] = {}
    for c in candidates:
        same_layout = (c.stages, c.replicas) == (plan.pipeline_stages, plan.num_replicas)
        if same_layout and c.step_ms is not None and c.microbatches != plan.num_microbatches:
            others[c.microbatches] = min(others.get(c.microbatches, c.step_ms), c.step_ms)
    if not others:
        return None
    listed = ", ".join(f"{m} -> {ms:.1f} ms" for m, ms in sorted(others.items())[:4])
    line = f"{plan.num_microbatches} micro-batch(es) predicted fastest; other counts compared: {listed}"
    if plan.pipeline_stages > 1 and plan.predicted_bubble > 0.3 and min(others) > plan.num_microbatches:
        line += (
            ". More micro-batches would shorten the bubble, but each one costs time that does not shrink with its "
            "size (kernel launches, transfers), and at this batch size that outweighs the bubble"
        )
    return line


def _ranks(ranks: Sequence[int]) -> str:
    if len(ranks) <= 3:
        return ",".join(map(str, ranks))
    step = ranks[1] - ranks[0]
    return f"{ranks[0]},{ranks[1]}..{ranks[-1]} (x{len(ranks)}, step {step})"


def _count(value: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if c == _MODULES_COLUMN else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths))
        )
        for r in rows
    ]
    return [lines[0], "-" * len(lines[0]), *lines[1:]]
