"""Step time of a pipeline schedule, by replaying its operations in order.

The bottleneck stage alone misjudges a pipeline: the fill and drain (the bubble) cost
``S - 1`` slots, and uneven stages or slow links stretch them. Here every rank runs its
forwards and backwards in the order the schedule gives them; an operation starts when its
rank is free and its input has arrived from the neighbouring stage. Same orders as
``torch.distributed.pipelining``'s ``ScheduleGPipe``, ``Schedule1F1B``,
``ScheduleInterleaved1F1B``, ``ScheduleInterleavedZeroBubble`` and ``ScheduleZBVZeroBubble``
(whose backward is two operations: "I", the input gradients sent upstream, and "W", the weight
gradients run later).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_rannc.plan.plan import PartitionPlan, stage_position

__all__ = [
    "ScheduleTimes",
    "ActionTimes",
    "simulate_schedule",
    "simulate_plan",
    "plan_action_ms",
    "operation_order",
    "in_flight",
    "weight_passes_pending",
    "split_backward",
]

INPUT_GRADIENT_SHARE = 0.5
"""Share of a backward's compute that the input gradients take under zero bubble (the rest is
the weight gradients): a matrix product's two gradients cost the same FLOPs."""

# What torch's split backward (``pipelining/_backward.py``) costs beyond the backward it splits,
# on the host, per micro-batch of a stage that is not the first. Measured on the 2-core CPU
# (torch 2.13, one thread; transformer blocks of the example GPT, 43-673 autograd nodes, against
# ``stage_backward``): the input pass walks the stage's autograd graph in Python to group the
# parameters with the intermediate values they hang off (about 6 us a node); the weight pass
# calls ``autograd.grad`` once a group, and each call's engine walks the graph below it (about
# 6 us a node plus 16 ns per node squared); the compute itself runs about 5% slower split.
# Host work, the same order on a GPU's host: nothing here has measured it there.
SPLIT_MS_PER_NODE = 0.0056
SPLIT_WEIGHT_MS_PER_NODE_SQUARED = 1.6e-5
SPLIT_COMPUTE_EXTRA = 0.05
AUTOGRAD_NODES_PER_GRAPH_NODE = 1.75
"""A captured graph node (``aten.linear``, a view, ...) makes about this many autograd nodes
(``AddmmBackward``, ``TBackward``, a parameter's ``AccumulateGrad``, ...): 169 autograd nodes
for 96 graph nodes in 4 blocks of the example GPT."""


@dataclass(frozen=True)
class ScheduleTimes:
    makespan_ms: float
    """From the first forward to the last backward."""
    busy_ms: list[float]
    """Compute time of each stage."""
    operations: list[list[tuple[str, int, float, float]]]
    """Per rank of a pipeline: ``(kind, microbatch, start_ms, end_ms)`` with kind ``"F"``,
    ``"B"``, or with zero bubble ``"I"`` and ``"W"`` (for charts); one rank runs several stages
    with interleaved schedules."""

    @property
    def bubble(self) -> float:
        """Share of the step the busiest stage idles: ``1 - busy / makespan``."""
        return max(0.0, 1.0 - max(self.busy_ms) / self.makespan_ms) if self.makespan_ms else 0.0


def operation_order(
    schedule: str,
    position: int,
    num_stages: int,
    num_microbatches: int,
    virtual_stages: int = 1,
    zero_bubble: bool = False,
) -> list[tuple[str, int, int]]:
    """The ``(kind, stage, microbatch)`` operations the rank at ``position`` runs, in order.

    ``num_stages`` counts ranks per pipeline (S); with ``virtual_stages`` V the rank runs stages
    ``position, position + S, ...`` (interleaved 1F1B), or with ``zbv`` stages ``position`` and
    ``2S - 1 - position``. ``zero_bubble``: the 1F1B ``schedule`` run as torch's
    ``ScheduleInterleavedZeroBubble`` (any V)."""
    if schedule == "zbv":
        return _zbv_order(position, num_stages, num_microbatches)
    if zero_bubble:
        return _zero_bubble_order(position, num_stages, virtual_stages, num_microbatches)
    if schedule == "interleaved_1f1b":
        return _interleaved_order(position, num_stages, virtual_stages, num_microbatches)
    forwards = [("F", position, m) for m in range(num_microbatches)]
    backwards = [("B", position, m) for m in range(num_microbatches)]
    if schedule == "gpipe":
        return forwards + backwards
    warmup = min(num_microbatches, num_stages - position - 1)
    order = forwards[:warmup]
    for m in range(num_microbatches - warmup):
        order += [forwards[warmup + m], backwards[m]]
    return order + backwards[num_microbatches - warmup :]


def _interleaved_order(
    position: int, num_ranks: int, virtual: int, num_microbatches: int
) -> list[tuple[str, int, int]]:
    """``ScheduleInterleaved1F1B``'s order (depth first, Megatron-LM's warm-up): rounds of up to
    S micro-batches pass through the rank's stages in turn; ``tests/unit/test_search.py`` checks
    it against torch's own ``pipeline_order``."""
    rounds = max(1, num_microbatches // num_ranks)
    per_round = num_microbatches // rounds
    total = virtual * num_microbatches
    warmup = min((virtual - 1) * per_round + 2 * (num_ranks - 1 - position), total)

    def forward_stage(step: int) -> int:
        return (step // per_round) % virtual * num_ranks + position

    def backward_stage(step: int) -> int:
        return (virtual - 1 - (step - warmup) // per_round % virtual) * num_ranks + position

    counts: dict[tuple[str, int], int] = {}
    order: list[tuple[str, int, int]] = []

    def add(kind: str, stage: int) -> None:
        microbatch = counts.get((kind, stage), 0)
        counts[(kind, stage)] = microbatch + 1
        order.append((kind, stage, microbatch))

    for step in range(total + warmup):
        if step < total:
            add("F", forward_stage(step))
        if step >= warmup:
            add("B", backward_stage(step))
    return order


def _zero_bubble_order(
    position: int, num_ranks: int, virtual: int, num_microbatches: int
) -> list[tuple[str, int, int]]:
    """``ScheduleInterleavedZeroBubble``'s order (ZB1P): interleaved 1F1B's rounds with a warm-up
    of one forward per hop to the last rank (not two), each backward's input pass "I" where the
    backward would be, and its weight pass "W" ``position`` passes later, so that the ranks
    nearer the start fill the drain with weight passes. ``tests/unit/test_search.py`` checks it
    against torch's own order."""
    rounds = max(1, num_microbatches // num_ranks)
    per_round = num_microbatches // rounds
    total = virtual * num_microbatches
    warmup = min((virtual - 1) * per_round + num_ranks - 1 - position, total)
    counts: dict[tuple[str, int], int] = {}
    order: list[tuple[str, int, int]] = []
    waiting: list[int] = []  # stages of input passes whose weight pass is still to run

    def add(kind: str, stage: int) -> None:
        microbatch = counts.get((kind, stage), 0)
        counts[(kind, stage)] = microbatch + 1
        order.append((kind, stage, microbatch))

    for step in range(total + warmup):
        if step < total:
            add("F", (step // per_round) % virtual * num_ranks + position)
        if step >= warmup:
            stage = (virtual - 1 - (step - warmup) // per_round % virtual) * num_ranks + position
            add("I", stage)
            waiting.append(stage)
            if step - warmup >= position:
                add("W", waiting.pop(0))
    for stage in waiting:
        add("W", stage)
    return order


def _zbv_order(position: int, num_ranks: int, num_microbatches: int) -> list[tuple[str, int, int]]:
    """``ScheduleZBVZeroBubble``'s order (ZB-V, arXiv 2401.10241 section 6): the rank runs stage
    ``down = position`` on the way down the V and ``up = 2S - 1 - position`` on the way back.
    Warm-up: forwards of ``down`` until the V's turn is reached, then ``up`` and ``down``
    alternating, then ``up``'s first backwards, each input pass followed by its weight pass. The
    steady state runs F, I, W of ``down`` then of ``up``; the cool-down runs the input passes of
    both first and the weight passes last, ``down``'s among its own input passes near the end.
    Planned for at least ``2S - 1`` micro-batches; with fewer, the operations of the missing
    ones are left out, as torch does. ``tests/unit/test_search.py`` checks it against torch's
    own order."""
    down, up = position, 2 * num_ranks - 1 - position
    padded = max(2 * num_ranks - 1, num_microbatches)
    counts: dict[tuple[str, int], int] = {}
    order: list[tuple[str, int, int]] = []

    def add(*operations: tuple[str, int]) -> None:
        for kind, stage in operations:
            microbatch = counts.get((kind, stage), 0)
            counts[(kind, stage)] = microbatch + 1
            order.append((kind, stage, microbatch))

    for _ in range(2 * (num_ranks - position) - 1):
        add(("F", down))
    for _ in range(position):
        add(("F", up), ("F", down))
    for _ in range(num_ranks - position):
        add(("F", up), ("I", up), ("W", up))
    while counts.get(("F", up), 0) < counts[("F", down)] or counts[("F", down)] < padded:
        if counts[("F", down)] < padded:
            add(("F", down))
        add(("I", down), ("W", down), ("F", up), ("I", up), ("W", up))
    for _ in range(position):
        add(("I", down), ("I", up))
    for _ in range(num_ranks - position):
        add(("I", down), ("W", down))
    for stage in (up, down):
        while counts.get(("W", stage), 0) < counts[("I", stage)]:
            add(("W", stage))
    return [operation for operation in order if operation[2] < num_microbatches]


def in_flight(
    schedule: str, num_ranks: int, num_microbatches: int, virtual_stages: int = 1, zero_bubble: bool = False
) -> list[int]:
    """Per stage, the most micro-batches whose activations it holds at once under ``schedule``
    (with zero bubble, until their weight pass: its inputs are the activations)."""
    peak = [0] * (num_ranks * virtual_stages)
    for position in range(num_ranks):
        held: dict[int, int] = {}
        order = operation_order(schedule, position, num_ranks, num_microbatches, virtual_stages, zero_bubble)
        for kind, stage, _ in order:
            if kind == "I":
                continue
            held[stage] = held.get(stage, 0) + (1 if kind == "F" else -1)
            peak[stage] = max(peak[stage], held[stage])
    return peak


def weight_passes_pending(
    num_ranks: int, num_microbatches: int, virtual_stages: int = 1, schedule: str = "1f1b"
) -> list[int]:
    """Per stage, the most micro-batches at once between their input and their weight pass under
    zero bubble. torch's input pass keeps the gradients of the weight operations' outputs for the
    weight pass (``stage_backward_input``'s parameter groups), beside the activations. The first
    stage has no input pass (torch runs its whole backward as the weight pass): none."""
    peak = [0] * (num_ranks * virtual_stages)
    for position in range(num_ranks):
        held: dict[int, int] = {}
        for kind, stage, _ in operation_order(schedule, position, num_ranks, num_microbatches, virtual_stages, True):
            if kind != "F" and stage > 0:
                held[stage] = held.get(stage, 0) + (1 if kind == "I" else -1)
                peak[stage] = max(peak[stage], held[stage])
    return peak


def split_backward(
    bwd_ms: float, recompute_ms: float, overhead_ms: float, graph_nodes: int = 0, first: bool = False
) -> tuple[float, float]:
    """A zero-bubble backward's input and weight passes, from the backward 1F1B would run
    (``bwd_ms``: compute, ``recompute_ms`` of recomputation, ``overhead_ms`` of the runtime's).

    The first stage's inputs need no gradient: torch skips its input pass and runs the whole
    backward as the weight pass. Elsewhere each pass pays the runtime's overhead per action and
    the split's host costs (``SPLIT_*``, growing with the stage's ``graph_nodes``); a checkpointed
    stage recomputes in both passes: non-reentrant checkpointing frees what it recomputed once
    the input pass has read it, and the weight pass, a second backward through the same graph,
    recomputes it again (once: see ``_compat._RecomputeOnceInWeightPass``)."""
    if first:
        return 0.0, bwd_ms
    compute = (bwd_ms - recompute_ms - overhead_ms) * (1 + SPLIT_COMPUTE_EXTRA)
    weight = compute * (1 - INPUT_GRADIENT_SHARE)
    nodes = AUTOGRAD_NODES_PER_GRAPH_NODE * graph_nodes
    walk = SPLIT_MS_PER_NODE * nodes
    return (
        compute - weight + recompute_ms + overhead_ms + walk,
        weight + recompute_ms + overhead_ms + walk + SPLIT_WEIGHT_MS_PER_NODE_SQUARED * nodes**2,
    )


def simulate_schedule(
    fwd_ms: Sequence[float],
    bwd_ms: Sequence[float],
    send_ms: Sequence[float],
    num_microbatches: int,
    schedule: str,
    virtual_stages: int = 1,
    weight_ms: Sequence[float] | None = None,
) -> ScheduleTimes:
    """Replay ``schedule`` on stages with the given per-micro-batch times.

    ``send_ms[s]`` is the time to move one micro-batch's activations from stage ``s`` to
    ``s + 1`` (and its gradients back); the last entry is unused. With ``virtual_stages`` V the
    ``len(fwd_ms)`` stages run on ``len(fwd_ms) / V`` ranks, stage ``s`` on rank ``s % S`` (with
    ``zbv`` in a V, ``stage_position``); the result has one row of operations per rank.
    ``weight_ms``: the schedule runs as zero bubble, ``bwd_ms`` being each backward's input pass
    and ``weight_ms`` its weight pass (``split_backward``).
    """
    num_stages = len(fwd_ms)
    num_ranks = num_stages // virtual_stages
    zero_bubble = weight_ms is not None
    durations = {"F": fwd_ms, "B": bwd_ms, "I": bwd_ms, "W": weight_ms or bwd_ms}
    orders = [
        operation_order(schedule, p, num_ranks, num_microbatches, virtual_stages, zero_bubble) for p in range(num_ranks)
    ]
    done: dict[tuple[str, int, int], float] = {}
    free = [0.0] * num_ranks
    next_op = [0] * num_ranks
    timeline: list[list[tuple[str, int, float, float]]] = [[] for _ in range(num_ranks)]
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for rank in range(num_ranks):
            while next_op[rank] < len(orders[rank]):
                kind, stage, mb = orders[rank][next_op[rank]]
                ready = _ready_at(kind, stage, mb, num_stages, done, send_ms)
                if ready is None:
                    break
                start = max(free[rank], ready)
                free[rank] = start + durations[kind][stage]
                done[(kind, stage, mb)] = free[rank]
                timeline[rank].append((kind, mb, start, free[rank]))
                next_op[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # cannot happen with the orders above; guards against an endless loop
            raise RuntimeError(f"Schedule {schedule!r} deadlocks in simulation.")
    per_microbatch = [fwd_ms[s] + bwd_ms[s] + (weight_ms[s] if weight_ms else 0.0) for s in range(num_stages)]
    positions = [stage_position(s, num_ranks, schedule) for s in range(num_stages)]
    busy = [num_microbatches * sum(t for t, q in zip(per_microbatch, positions) if q == p) for p in range(num_ranks)]
    return ScheduleTimes(makespan_ms=max(free), busy_ms=busy, operations=timeline)


ActionTimes = tuple[list[float], list[float], list[float] | None]
"""Each stage's forward and backward of one micro-batch, and with zero bubble its weight pass
apart from the input pass (the backward); ``None`` without."""


def simulate_plan(plan: PartitionPlan, actions: ActionTimes | None = None) -> ScheduleTimes:
    """Replay a saved plan's schedule from its stages' times (``python -m lightning_rannc show
    --chart``). Plans from the search carry each stage's send time and the runtime's overhead per
    action, so this gives the times the search predicted with; older plans replay without them.
    ``actions``: replay with these instead of the plan's (``plan_action_ms``), measured ones say.
    """
    forwards, backwards, weights = actions or plan_action_ms(plan)
    return simulate_schedule(
        forwards,
        backwards,
        [stage.send_ms for stage in plan.stages],
        plan.num_microbatches,
        plan.schedule,
        plan.virtual_stages,
        weights,
    )


def plan_action_ms(plan: PartitionPlan) -> ActionTimes:
    """Each stage's predicted forward and backward of one micro-batch as the schedule runs them
    (the runtime's overhead per action included), and with zero bubble its weight passes apart
    from the input passes (``backwards``); ``None`` without."""
    overhead = plan.predicted_action_overhead_ms
    backwards = [stage.bwd_ms + overhead for stage in plan.stages]
    weights = None
    if plan.zero_bubble:  # the reported backward includes the recomputation: split it as the search did
        halves = [
            split_backward(b, stage.recompute_ms, overhead, stage.node_end - stage.node_start, stage.stage_index == 0)
            for b, stage in zip(backwards, plan.stages)
        ]
        backwards, weights = [i for i, _ in halves], [w for _, w in halves]
    return [stage.fwd_ms + overhead for stage in plan.stages], backwards, weights


def _ready_at(
    kind: str, stage: int, mb: int, num_stages: int, done: dict[tuple[str, int, int], float], send_ms: Sequence[float]
) -> float | None:
    """When the input of an operation is available, or None while its producer has not run."""
    if kind == "F":
        if stage == 0:
            return 0.0
        produced = done.get(("F", stage - 1, mb))
        return None if produced is None else produced + send_ms[stage - 1]
    if kind == "W":  # after its input pass, on the same rank
        return done.get(("I", stage, mb))
    if stage == num_stages - 1:
        return done.get(("F", stage, mb))
    produced = done.get((kind, stage + 1, mb))
    return None if produced is None else produced + send_ms[stage]
