"""Step time of a pipeline schedule, by replaying its operations in order.

The bottleneck stage alone misjudges a pipeline: the fill and drain (the bubble) cost
``S - 1`` slots, and uneven stages or slow links stretch them. Here every rank runs its
forwards and backwards in the order the schedule gives them; an operation starts when its
rank is free and its input has arrived from the neighbouring stage. Same orders as
``torch.distributed.pipelining``'s ``ScheduleGPipe`` and ``Schedule1F1B``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ScheduleTimes", "simulate_schedule", "operation_order"]


@dataclass(frozen=True)
class ScheduleTimes:
    makespan_ms: float
    """From the first forward to the last backward."""
    busy_ms: list[float]
    """Compute time of each stage."""
    operations: list[list[tuple[str, int, float, float]]]
    """Per stage: ``(kind, microbatch, start_ms, end_ms)`` with kind ``"F"`` or ``"B"`` (for charts)."""

    @property
    def bubble(self) -> float:
        """Share of the step the busiest stage idles: ``1 - busy / makespan``."""
        return max(0.0, 1.0 - max(self.busy_ms) / self.makespan_ms) if self.makespan_ms else 0.0


def operation_order(schedule: str, position: int, num_stages: int, num_microbatches: int) -> list[tuple[str, int]]:
    """The ``(kind, microbatch)`` operations one stage runs, in order."""
    forwards = [("F", m) for m in range(num_microbatches)]
    backwards = [("B", m) for m in range(num_microbatches)]
    if schedule == "gpipe":
        return forwards + backwards
    warmup = min(num_microbatches, num_stages - position - 1)
    order = forwards[:warmup]
    for m in range(num_microbatches - warmup):
        order += [forwards[warmup + m], backwards[m]]
    return order + backwards[num_microbatches - warmup :]


def simulate_schedule(
    fwd_ms: Sequence[float],
    bwd_ms: Sequence[float],
    send_ms: Sequence[float],
    num_microbatches: int,
    schedule: str,
) -> ScheduleTimes:
    """Replay ``schedule`` ("gpipe" or "1f1b") on stages with the given per-micro-batch times.

    ``send_ms[s]`` is the time to move one micro-batch's activations from stage ``s`` to
    ``s + 1`` (and its gradients back); the last entry is unused.
    """
    num_stages = len(fwd_ms)
    orders = [operation_order(schedule, s, num_stages, num_microbatches) for s in range(num_stages)]
    done: dict[tuple[str, int, int], float] = {}
    free = [0.0] * num_stages
    next_op = [0] * num_stages
    timeline: list[list[tuple[str, int, float, float]]] = [[] for _ in range(num_stages)]
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for stage in range(num_stages):
            while next_op[stage] < len(orders[stage]):
                kind, mb = orders[stage][next_op[stage]]
                ready = _ready_at(kind, stage, mb, num_stages, done, send_ms)
                if ready is None:
                    break
                start = max(free[stage], ready)
                free[stage] = start + (fwd_ms[stage] if kind == "F" else bwd_ms[stage])
                done[(kind, stage, mb)] = free[stage]
                timeline[stage].append((kind, mb, start, free[stage]))
                next_op[stage] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # cannot happen with the orders above; guards against an endless loop
            raise RuntimeError(f"Schedule {schedule!r} deadlocks in simulation.")
    busy = [num_microbatches * (f + b) for f, b in zip(fwd_ms, bwd_ms)]
    return ScheduleTimes(makespan_ms=max(free), busy_ms=busy, operations=timeline)


def _ready_at(
    kind: str, stage: int, mb: int, num_stages: int, done: dict[tuple[str, int, int], float], send_ms: Sequence[float]
) -> float | None:
    """When the input of an operation is available, or None while its producer has not run."""
    if kind == "F":
        if stage == 0:
            return 0.0
        produced = done.get(("F", stage - 1, mb))
        return None if produced is None else produced + send_ms[stage - 1]
    if stage == num_stages - 1:
        return done.get(("F", stage, mb))
    produced = done.get(("B", stage + 1, mb))
    return None if produced is None else produced + send_ms[stage]
