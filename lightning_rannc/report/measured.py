"""One training step read back from a runtime trace, to set beside the plan's prediction.

``RaNNCStrategy(trace=...)`` (``runtime/trace.py``) writes a Chrome trace of what each rank did;
``read_measured_step`` picks one training step out of it, one row of events per rank, with time
0 at the step's first event on any rank. ``chart.write_comparison_chart`` draws it below the
predicted step.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from lightning_rannc.errors import PlanError
from lightning_rannc.plan.plan import PartitionPlan
from lightning_rannc.report.labels import Operation

__all__ = [
    "MeasuredEvent",
    "MeasuredStep",
    "read_measured_step",
    "clock_offsets",
    "trace_clocks",
    "load_trace",
    "check_measured",
    "steps_text",
    "MEASURED_KINDS",
]

MEASURED_KINDS = {
    "forward": "F",
    "backward": "B",
    "communication": "p2p",
    "collective": "exchange",
    "optimizer": "update",
}
"""Runtime trace category -> the kind of box it is drawn as."""


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
    clock_offsets_ms: dict[int, float] = field(default_factory=dict)
    """What was added to each rank's times to align its clock with the others' (``clock_offsets``)."""

    @property
    def duration_ms(self) -> float:
        """From the step's first event to its last, over all ranks."""
        return max((e.end_ms for events in self.rows.values() for e in events), default=0.0)

    def operations(self, rank: int) -> list[Operation]:
        """The rank's forwards and backwards as ``(kind, micro_batch, start_ms, end_ms)``."""
        return [
            (MEASURED_KINDS[e.category], int(e.args["micro_batch"]), e.start_ms, e.end_ms)
            for e in self.rows[rank]
            if e.category in ("forward", "backward")
        ]


def read_measured_step(
    trace: str | Path | Mapping[str, Any] | Sequence[Mapping[str, Any]], step: int | None = None
) -> MeasuredStep:
    """One training step of a runtime trace (see ``chart.write_comparison_chart``); the last
    recorded one when ``step`` is None. Raises ``PlanError`` for a file that is not a runtime
    trace or a step it did not record."""
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
        raise PlanError(f"{source} recorded steps {steps_text(steps)}, not step {step}: pick one of them.")
    offsets = clock_offsets(timed, trace_clocks(events))
    mine = [e for e in timed if e["args"]["step"] == step]
    origin = min(_start_ms(e, offsets) for e in mine)
    ranks = {int(e["pid"]) for e in events if e.get("name") == "process_name"} | {int(e["pid"]) for e in mine}
    rows: dict[int, list[MeasuredEvent]] = {rank: [] for rank in sorted(ranks)}
    for e in sorted(mine, key=lambda e: _start_ms(e, offsets)):
        start_ms = _start_ms(e, offsets) - origin
        rows[int(e["pid"])].append(
            MeasuredEvent(e["name"], e.get("cat", ""), start_ms, start_ms + float(e["dur"]) / 1e3, e["args"])
        )
    return MeasuredStep(step=step, steps=steps, rows=rows, clock_offsets_ms=offsets)


def clock_offsets(events: Sequence[Mapping[str, Any]], clocks: Mapping[int, int] | None = None) -> dict[int, float]:
    """Per rank, the ms to add to its times so that every rank's clock agrees with rank 0's;
    ranks with no offset are left out.

    ``clocks`` maps each rank to its clock (``process_name``'s ``clock``, see ``trace_clocks``):
    the trace puts the ranks of one host on one clock, exactly. Without it (traces written
    before it) every rank has its own: the runtime sets each rank's clock to 0 as it leaves a
    barrier, and ranks leave a gloo barrier milliseconds apart (4.4-8.0 ms on the 2-core CPU),
    so a receive could appear to end before the forward that made its data. Sends and receives
    bound the difference between two clocks: a receive of ``F m`` at stage ``s`` ends after the
    forward of ``m`` at stage ``s - 1`` ended, and a receive of ``B m`` after the backward
    (input pass) of ``m`` at ``s + 1``. With messages both ways the difference is the middle of
    the two bounds (latency taken as equal both ways); one way only, the least shift that makes
    the messages causal. Where a stage has several ranks (data-parallel replicas) which one sent
    is unknown: on one clock, the earliest of them bounds the receive; on several, none does."""
    clocks = clocks or {}
    produced: dict[tuple[int, str, int, int], list[tuple[int, float]]] = defaultdict(list)
    for e in events:
        if e.get("cat") in ("forward", "backward") and "stage" in e["args"]:
            kind = "F" if e["cat"] == "forward" else "B" if e["name"][:1] in ("B", "I") else None
            if kind is not None:
                key = (int(e["args"]["step"]), kind, int(e["args"]["stage"]), int(e["args"]["micro_batch"]))
                produced[key].append((int(e["pid"]), _end_ms(e)))
    least: dict[tuple[int, int], float] = {}  # (sender's clock, receiver's) -> the least receiver - sender offset
    for e in events:
        if e.get("cat") != "communication":
            continue
        receiver = clocks.get(int(e["pid"]), int(e["pid"]))
        for op, stage in _ops_with_stages(e["args"]):
            match = re.fullmatch(r"recv ([FB])(\d+)", op)
            if match is None:
                continue
            kind, microbatch = match[1], int(match[2])
            senders = produced.get((int(e["args"]["step"]), kind, stage - 1 if kind == "F" else stage + 1, microbatch))
            sender_clocks = {clocks.get(rank, rank) for rank, _ in senders or []}
            if len(sender_clocks) != 1 or receiver in sender_clocks:
                continue
            pair = (sender_clocks.pop(), receiver)
            least[pair] = max(least.get(pair, -math.inf), min(sent for _, sent in senders or []) - _end_ms(e))
    by_clock = _spread(least)
    ranks = {int(e["pid"]) for e in events} | set(clocks)
    shifts = {rank: by_clock.get(clocks.get(rank, rank), 0.0) for rank in ranks}
    return {rank: offset for rank, offset in sorted(shifts.items()) if offset}


def trace_clocks(events: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    """Each rank's clock, as the trace names it (``runtime.trace.on_host_clocks``); empty for a
    trace written before it, where every rank has its own."""
    return {
        int(e["pid"]): int(e["args"]["clock"])
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name" and "clock" in (e.get("args") or {})
    }


def _ops_with_stages(args: Mapping[str, Any]) -> list[tuple[str, int]]:
    """A wait's operations (``send F2``, ``recv B1``) each with its stage. Traces written before
    ``op_stages`` name only the wait's stages: a single one is every operation's; several are
    ambiguous (an interleaved rank's two stages in one wait), and the wait is left out."""
    ops = args.get("ops", [])
    if "op_stages" in args:
        return list(zip(ops, args["op_stages"], strict=True))
    stages = args.get("stages", [])
    return [(op, stages[0]) for op in ops] if len(stages) == 1 else []


def _spread(least: Mapping[tuple[int, int], float]) -> dict[int, float]:
    """Offsets of clocks from their pairwise bounds, from the lowest clock of each connected set outwards."""
    between: dict[int, dict[int, float]] = defaultdict(dict)  # a -> b -> offset of b less a's
    for a, b in least:
        low, high = least[(a, b)], -least.get((b, a), -math.inf)
        between[a][b] = (low + high) / 2 if math.isfinite(high) else max(low, 0.0)
        between[b][a] = -between[a][b]
    offsets: dict[int, float] = {}
    for root in sorted(between):
        if root in offsets:
            continue
        offsets[root], todo = 0.0, [root]
        while todo:
            a = todo.pop()
            for b, difference in between[a].items():
                if b not in offsets:
                    offsets[b] = offsets[a] + difference
                    todo.append(b)
    return {rank: offset for rank, offset in offsets.items() if abs(offset) > 1e-6}  # not rounding's


def _start_ms(event: Mapping[str, Any], offsets: Mapping[int, float]) -> float:
    return float(event["ts"]) / 1e3 + offsets.get(int(event["pid"]), 0.0)


def _end_ms(event: Mapping[str, Any]) -> float:
    return (float(event["ts"]) + float(event["dur"])) / 1e3


def load_trace(trace: str | Path | Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The events of a runtime trace (a path, its JSON object or its ``traceEvents``), read once
    for several ``read_measured_step`` calls; ``PlanError`` if it is not a Chrome trace."""
    return _trace_events(trace, f"The trace {str(trace)!r}" if isinstance(trace, (str, Path)) else "The trace")


def check_measured(plan: PartitionPlan, measured: MeasuredStep) -> None:
    """Refuse a trace recorded on another number of ranks than the plan's."""
    if len(measured.rows) != plan.world_size:
        raise PlanError(
            f"The trace was recorded on {len(measured.rows)} rank(s) but the plan is for {plan.world_size} "
            "device(s): compare a run with the plan it used (RaNNCStrategy(deployment='plan.json') saves it)."
        )


def steps_text(steps: Sequence[int]) -> str:
    """``1-3`` for consecutive steps, else the list."""
    return f"{steps[0]}-{steps[-1]}" if list(steps) == list(range(steps[0], steps[-1] + 1)) else str(list(steps))


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
