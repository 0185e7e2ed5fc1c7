"""The planner's search: stages x replicas x micro-batches x checkpointing x schedule x ZeRO
stage x optimizer offload.

For every layout the device count allows (``S`` stages, ``D = N / S`` replicas), every
micro-batch count ``M`` (each divisor of the replica's batch up to ``max_micro_batches``, each
micro-batch at least ``min_micro_batch_size``), every stage count per rank (interleaving) and
every ZeRO stage (0, 1, 2; offload to the host only where the state does not fit; 3 after
them, for the next shallower pipeline than the best plan and one stage, ``_with_zero3``), an
exact dynamic program (``solver.min_max_partition``) splits the blocks into ``S`` stages with
the smallest bottleneck among the splits whose every stage fits in memory; a stage that does not
fit recomputes the activations of its fewest first layers that make it fit, or all of them, if
allowed. Each candidate's step time is then simulated (``simulate.simulate_schedule``) with the
part of the data-parallel gradient exchange the schedule does not hide added, and the fastest
wins. Schedule: 1F1B when ``M >= S`` (same time as GPipe, fewer activations in flight), else
GPipe; a schedule can be forced. A data-parallel layout (one stage) takes the fewest
micro-batches that fit without recomputation or offload (and the fewer counts that fit only
with them): more only split the same work into smaller, slower pieces. When nothing
fits with at most ``max_micro_batches``, the search widens to every count that splits the batch
(micro-batches down to ``min_micro_batch_size``) before it refuses: a default never turns a
feasible problem into a refusal. Candidates are compared by throughput: with a fixed global
batch that is the step time; with a fixed batch per replica (``replica_batch_size``, what a
Lightning data loader gives each replica) more replicas also mean more samples per step.

Costs are given for one micro-batch of ``reference_microbatch_size`` samples and scaled to other
micro-batch sizes (``BlockCost.scaled``: a fixed part, and a part in proportion to the size).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lightning_rannc.errors import PlanError
from lightning_rannc.plan.cost_model import BlockCost
from lightning_rannc.plan.devices import DeviceSpec
from lightning_rannc.plan.memory import StageMemory, TensorTable, busiest_share, optimizer_state_factor, stage_memory
from lightning_rannc.plan.modules import describe_span, layer_of
from lightning_rannc.plan.plan import (
    V_SHAPED,
    PartitionPlan,
    StagePlan,
    choose_microbatches,
    rounds_fit,
    stage_position,
    stage_ranks,
)
from lightning_rannc.plan.simulate import (
    ScheduleTimes,
    in_flight,
    simulate_schedule,
    split_backward,
    weight_passes_pending,
)
from lightning_rannc.plan.solver import min_max_partition

__all__ = ["SearchSettings", "Candidate", "SearchResult", "search_plan", "evaluate_split", "plan_shape"]


@dataclass(kw_only=True)
class SearchSettings:
    """What to plan for, and which choices are fixed."""

    num_devices: int
    global_batch_size: int
    """Samples per optimizer step over all replicas (ignored with ``replica_batch_size``)."""
    replica_batch_size: int | None = None
    """Samples per step of each replica, whatever the replica count (a Lightning data loader's
    batch size: the global batch is this times the replicas)."""
    device: DeviceSpec
    devices_per_node: int = 8
    memory_limit: int | None = None
    """Bytes per device; ``None``: the device's memory."""
    memory_margin: float = 0.1
    """Share of the limit kept free (allocator fragmentation, temporary buffers)."""
    optimizer: str = "adamw"
    zero_stage: int | None = None
    """Optimizer state over replicas: 1 split (ZeRO-1), 0 whole on each (as DDP); ``None``: per
    layout, the faster that fits (0 saves the broadcast of the updated shares, 1 memory)."""
    pipeline_stages: int | None = None
    replicas: int | None = None
    micro_batches: int | None = None
    max_micro_batches: int = 64
    min_micro_batch_size: int = 1
    schedule: str = "auto"
    virtual_stages: int | None = None
    """Stages per rank (interleaved 1F1B); ``None``: 1, and 2, 3 or 4 where the schedule may be interleaved."""
    activation_checkpointing: bool | None = None
    """``None``: per stage, only where memory demands it."""
    selective_checkpointing: bool = True
    """With ``activation_checkpointing=None``: a stage that needs checkpointing recomputes only its
    fewest first layers that make it fit; ``False``: all of them (to compare with the old search)."""
    offload_optimizer: bool | None = None
    """Optimizer state and step in host memory: always, never, or (``None``) for a layout that does
    not fit otherwise (offloading only adds transfers, so it never wins where the state fits)."""
    accumulating: bool = False
    """Gradients are accumulated over several batches (``accumulate_grad_batches`` > 1): the
    earlier batches' gradients live through each schedule (``memory.stage_memory``)."""
    zero_bubble: bool | None = None
    """Plans run their 1F1B schedule as zero bubble: GPipe is excluded, and micro-batch counts
    must split into torch's whole rounds (``rounds_fit``). Simulated in torch's zero-bubble order, each
    backward as an input and a weight pass (``simulate.split_backward``). ``None``: the search's
    choice, where predicted faster by ``device.schedule_margin`` without recomputation
    (``_with_zero_bubble``)."""
    epoch_samples: int | None = 0
    """Samples of a training epoch whose last batch may be smaller (a data loader without
    ``drop_last``): each replica's last batch has ``ceil(epoch_samples / D) % B`` samples, as
    Lightning's distributed sampler deals them. ``0``: every batch is full; ``None``: the batch
    sizes are unknown. Interleaving and zero bubble, which need whole rounds of micro-batches,
    are chosen only where every batch splits into them (forced, a batch that does not is refused
    when it comes)."""

    @property
    def usable_memory(self) -> float:
        limit = self.device.memory_bytes if self.memory_limit is None else self.memory_limit
        return limit * (1.0 - self.memory_margin)


@dataclass(frozen=True)
class Candidate:
    """One layout the search looked at."""

    stages: int
    replicas: int
    microbatches: int
    schedule: str
    step_ms: float | None
    """Predicted step time; None if no split fits in memory."""
    virtual_stages: int = 1
    zero_stage: int = 1
    offload: bool = False
    zero_bubble: bool = False
    bubble: float = 0.0
    """Predicted share of the step the busiest rank idles."""


@dataclass
class SearchResult:
    plan: PartitionPlan
    times: ScheduleTimes
    """The simulated schedule of the plan (per-stage operation times)."""
    candidates: list[Candidate] = field(default_factory=list)


def search_plan(
    blocks: Sequence[BlockCost],
    *,
    reference_microbatch_size: int,
    settings: SearchSettings,
    tensors: TensorTable,
    graph_fingerprint: str,
) -> SearchResult:
    """The plan with the lowest predicted step time; ``PlanError`` naming what would fit if none does."""
    ranges = _RangeTables(blocks, tensors)
    candidates: list[Candidate] = []
    settings = _zbv_settings(settings)
    choose_zero_bubble = settings.zero_bubble is None
    settings = _replace(settings, zero_bubble=False) if choose_zero_bubble else settings
    best = _best_plan(blocks, ranges, settings, reference_microbatch_size, candidates)
    if best is None and _widened(settings) is not None:
        settings = _widened(settings) or settings
        best = _best_plan(blocks, ranges, settings, reference_microbatch_size, candidates)
    if choose_zero_bubble:
        best = _with_zero_bubble(blocks, ranges, settings, reference_microbatch_size, candidates, best)
    best = _with_zero3(blocks, ranges, settings, reference_microbatch_size, candidates, best)
    if best is None:
        raise _infeasible(blocks, ranges, settings, reference_microbatch_size, candidates)
    plan, times = best
    plan.graph_fingerprint = graph_fingerprint
    plan.validate()
    return SearchResult(plan=plan, times=times, candidates=candidates)


def _zbv_settings(settings: SearchSettings) -> SearchSettings:
    """ZB-V asked for: two stages per rank, as zero bubble (what it is, not a choice)."""
    if settings.schedule != "zbv":
        return settings
    if settings.zero_bubble is False or settings.virtual_stages not in (None, 2):
        raise PlanError(
            f"schedule='zbv' runs two stages per rank as zero bubble, not with zero_bubble={settings.zero_bubble} "
            f"and virtual_stages={settings.virtual_stages}: leave those to the planner, or use "
            "schedule='interleaved_1f1b'."
        )
    if settings.pipeline_stages == 1 or settings.num_devices == 1:
        raise PlanError(
            "schedule='zbv' places two stages on each rank of a pipeline in a V, so it needs pipelines of two "
            "ranks at least: use pipeline_stages='auto' or >= 2 on several devices, or another schedule."
        )
    return _replace(settings, zero_bubble=True, virtual_stages=2)


def _with_zero3(
    blocks: Sequence[BlockCost],
    ranges: _RangeTables,
    settings: SearchSettings,
    reference: int,
    candidates: list[Candidate],
    best: tuple[PartitionPlan, ScheduleTimes] | None,
) -> tuple[PartitionPlan, ScheduleTimes] | None:
    """``best``, or where the search chooses the ZeRO stage, a faster plan with ZeRO-3. Its
    gathers only add transfers, so it can win only by fitting a shallower pipeline than
    ``best`` (fewer stages, more replicas): the next shallower layout and pure data
    parallelism are tried, without interleaving (every layout when nothing fits). Trying every
    shallower one made a BERT-77b search 82 s instead of 49, with interleaving 66 s."""
    if settings.zero_stage is not None or settings.zero_bubble:
        return best
    layouts = [s for s, _ in _layouts(settings, len(blocks))]
    if best is None:
        stages = set(layouts)
    else:
        shallower = [s for s in layouts if s < best[0].pipeline_stages]
        stages = {max(shallower), 1} if shallower else set()
    sharded = _best_plan(blocks, ranges, settings, reference, candidates, zero3_stages=stages) if stages else None
    if sharded is None or best is None:
        return sharded or best
    return sharded if _ms_per_sample(settings, sharded[0]) < _ms_per_sample(settings, best[0]) else best


def _with_zero_bubble(
    blocks: Sequence[BlockCost],
    ranges: _RangeTables,
    settings: SearchSettings,
    reference: int,
    candidates: list[Candidate],
    best: tuple[PartitionPlan, ScheduleTimes] | None,
) -> tuple[PartitionPlan, ScheduleTimes] | None:
    """``best``, or a faster plan with zero bubble. Zero bubble fills a pipeline's bubble, but
    each backward pays two passes, activations live longer and the replicas exchange gradients
    after the schedule: it cannot beat the busiest rank's time of the same shape without it.
    So it is tried, with every micro-batch count and stages per rank, on the layouts (stages x
    replicas) where some shape's time less its bubble beats ``best``: a search of every layout
    again would take a BERT-77b plan over its minute. Zero bubble is not chosen for stages that
    would have to recompute activations."""
    if best is None or settings.schedule == "gpipe" or settings.zero_stage == 3:
        return best  # ZeRO-3 forced: its gathers would live until the weight pass
    target = _ms_per_sample(settings, best[0])
    layouts = sorted(
        {
            (c.stages, c.replicas)
            for c in candidates
            if c.stages > 1
            and c.step_ms is not None
            and not c.zero_bubble
            and c.step_ms * (1 - c.bubble) / (_replica_batch(settings, c.replicas) * c.replicas)
            < (1 - settings.device.schedule_margin) * target
        }
    )
    # Without recomputation unless forced: under zero bubble the weight pass recomputes again what
    # the input pass did, and 2 stages so measured 0.63 of that prediction on CPU.
    checkpointing = settings.activation_checkpointing or False
    tries = [(layout, settings.schedule) for layout in layouts]
    # ZB-V too where the schedule and stages per rank are the search's to choose (or ZB-V's own).
    # Its V gives a rank the first and the last stage: a huge last block (a head) can have a rank
    # nearly to itself, which no looped placement allows, so its layouts are those whose ideal
    # balance beats ``best``, not only those whose bubble does.
    if settings.schedule == "auto" and settings.virtual_stages in (None, 2):
        ideal = _balanced_ms_per_sample(blocks, reference)
        more = {
            (c.stages, c.replicas)
            for c in candidates
            if c.stages > 1
            and c.step_ms is not None
            and ideal(c.stages, c.replicas) < (1 - settings.device.schedule_margin) * target
        }
        tries += [(layout, "zbv") for layout in sorted(set(layouts) | more)]
    for (stages, replicas), schedule in tries:
        layout = _replace(
            settings,
            pipeline_stages=stages,
            replicas=replicas,
            zero_bubble=True,
            activation_checkpointing=checkpointing,
            schedule=schedule,
        )
        found = _best_plan(blocks, ranges, layout, reference, candidates, chosen_rounds=True)
        margin = 1 - settings.device.schedule_margin
        if found is not None and _ms_per_sample(settings, found[0]) < margin * _ms_per_sample(settings, best[0]):
            best = found
    return best


def _balanced_ms_per_sample(blocks: Sequence[BlockCost], reference: int) -> Callable[[int, int], float]:
    """A bound on any split's compute per sample of the global batch on ``stages`` x
    ``replicas``: the busiest rank does at least its even share, and at least the largest block
    (the profile scaled per sample; fixed costs, sends and bubbles left out)."""
    per_sample = [(b.fwd_ms + b.bwd_ms) / reference for b in blocks]
    total, largest = sum(per_sample), max(per_sample)
    return lambda stages, replicas: max(total / stages, largest) / replicas


def _ms_per_sample(settings: SearchSettings, plan: PartitionPlan) -> float:
    return plan.predicted_step_ms / (_replica_batch(settings, plan.num_replicas) * plan.num_replicas)


def _best_plan(
    blocks: Sequence[BlockCost],
    ranges: _RangeTables,
    settings: SearchSettings,
    reference: int,
    candidates: list[Candidate],
    zero3_stages: set[int] | None = None,
    chosen_rounds: bool = False,
) -> tuple[PartitionPlan, ScheduleTimes] | None:
    """The fastest plan per sample over every layout and pipeline shape; each shape tried is
    added to ``candidates``. ``zero3_stages``: only ZeRO-3, on layouts of these stage counts
    (see ``_with_zero3``); else ZeRO-3 only where forced. ``chosen_rounds``: zero bubble is the
    search's choice, not the user's (every batch must split into its rounds)."""
    best: tuple[float, _Layout, _Split, int] | None = None  # (ms per sample, ..., its candidate's index)
    zero_bubble = bool(settings.zero_bubble)
    tried = {_tried_key(c) for c in candidates}
    for stages, replicas in _layouts(settings, len(blocks)):
        if zero3_stages is not None and (stages not in zero3_stages or replicas == 1):
            continue
        for microbatches, virtual in _pipeline_shapes(settings, stages, replicas, len(blocks), chosen_rounds):
            if zero3_stages is not None and virtual > 1:
                continue  # interleaving would gather every parameter once more per stage a rank runs
            fits = False
            plainly = False  # something fits this shape without recomputing or offloading
            on_devices: set[int] = set()  # ZeRO stages that fit this shape without offload
            zero3 = [(3, settings.offload_optimizer is True)]
            choices = zero3 if zero3_stages is not None else _memory_choices(settings, replicas)
            schedule = _schedule(settings, stages, microbatches, virtual)
            for zero, offload in choices:
                if (stages, replicas, microbatches, virtual, schedule, zero, offload, zero_bubble) in tried:
                    continue
                if offload and settings.offload_optimizer is None and on_devices:
                    continue  # offloading only adds transfers: tried where the state does not fit
                shape = (stages, replicas, microbatches, virtual)
                layout = _make_layout(blocks, ranges, settings, shape, reference, zero, offload)
                found = None if _state_exceeds_devices(layout) else _plan_layout(layout)
                step = found[0].predicted_step_ms if found else None
                bubble = found[0].predicted_bubble if found else 0.0
                candidate = Candidate(
                    stages, replicas, microbatches, layout.schedule, step, virtual, zero, offload, zero_bubble, bubble
                )
                candidates.append(candidate)
                if found and not offload:
                    on_devices.add(zero)
                per_sample = step / (_replica_batch(settings, replicas) * replicas) if step is not None else None
                if per_sample is not None and virtual > 1 and settings.virtual_stages is None:
                    per_sample /= 1 - settings.device.schedule_margin  # chosen, not forced: it must win by it
                if found and per_sample is not None and (best is None or per_sample < best[0]):
                    best = (per_sample, layout, found, len(candidates) - 1)
                fits = fits or found is not None
                plainly = plainly or (found is not None and not offload and not _recomputes(found[0]))
            if plainly and stages == 1 and settings.micro_batches is None:
                # One stage: the fewest micro-batches that fit (the counts ascend) without
                # recomputation or offload; more micro-batches may beat those (BERT 3.9B on 8
                # H100s: 8 of 4 samples, 8,157 ms, against 1 recomputed, a 2-stage pipeline's 8,676).
                break
    if best is None:
        return None
    _, layout, found, index = best
    plan, times, _ = _settle_on_schedule(layout, found)
    candidates[index] = dataclasses.replace(
        candidates[index], step_ms=plan.predicted_step_ms, bubble=plan.predicted_bubble
    )
    return plan, times


def _recomputes(plan: PartitionPlan) -> bool:
    return any(s.checkpoint or s.recompute_end is not None for s in plan.stages)


def _tried_key(c: Candidate) -> tuple[int, int, int, int, str, int, bool, bool]:
    return (c.stages, c.replicas, c.microbatches, c.virtual_stages, c.schedule, c.zero_stage, c.offload, c.zero_bubble)


def _zero_stages(settings: SearchSettings, replicas: int) -> list[int]:
    """Optimizer-state layouts to try: one replica has nothing to split."""
    if settings.zero_stage is not None:
        return [settings.zero_stage]
    return [0, 1, 2] if replicas > 1 else [1]


def _memory_choices(settings: SearchSettings, replicas: int) -> list[tuple[int, bool]]:
    """(ZeRO stage, optimizer offloaded) pairs to try, those without offload first. Where the
    search chooses, offload is tried with the ZeRO stage that needs the least device memory
    (ZeRO-2 with replicas: the host then holds and steps 1/D of the state), as ZeRO-Offload does."""
    zeros = _zero_stages(settings, replicas)
    if settings.offload_optimizer is not None:
        return [(zero, settings.offload_optimizer) for zero in zeros]
    if settings.device.host_is_device:  # the host's memory is the device's: nothing to free
        return [(zero, False) for zero in zeros]
    return [(zero, False) for zero in zeros] + [(max(zeros), True)]


def _widened(settings: SearchSettings) -> SearchSettings | None:
    """``settings`` with every micro-batch count that splits the batch allowed, or ``None`` when
    the count is forced or ``max_micro_batches`` already allows them all."""
    largest = settings.replica_batch_size or settings.global_batch_size
    if settings.micro_batches is not None or settings.max_micro_batches >= largest:
        return None
    return _replace(settings, max_micro_batches=largest)


def _layouts(settings: SearchSettings, num_blocks: int) -> list[tuple[int, int]]:
    devices = settings.num_devices
    layouts = [(s, devices // s) for s in range(1, min(devices, num_blocks) + 1) if devices % s == 0]
    if settings.pipeline_stages is not None:
        layouts = [(s, d) for s, d in layouts if s == settings.pipeline_stages]
    if settings.replicas is not None:
        layouts = [(s, d) for s, d in layouts if d == settings.replicas]
    if not layouts:
        raise PlanError(
            f"No layout of {devices} device(s) has pipeline_stages={settings.pipeline_stages} and "
            f"replicas={settings.replicas} (stages x replicas must equal the device count, and there are "
            f"{num_blocks} blocks to split)."
        )
    return layouts


def _replica_batch(settings: SearchSettings, replicas: int) -> int:
    """Samples each replica runs per step (0: the global batch does not split evenly)."""
    if settings.replica_batch_size is not None:
        return settings.replica_batch_size
    return 0 if settings.global_batch_size % replicas else settings.global_batch_size // replicas


def _microbatch_counts(settings: SearchSettings, replicas: int) -> list[int]:
    """Every count that splits the replica's batch evenly (the runtime needs equal micro-batch
    shapes), not just powers of two: 96 samples over 16 replicas take M = 6, not only 2."""
    per_replica = _replica_batch(settings, replicas)
    if per_replica == 0:
        return []
    counts = (
        [settings.micro_batches] if settings.micro_batches is not None else range(1, settings.max_micro_batches + 1)
    )
    return [m for m in counts if per_replica % m == 0 and per_replica // m >= settings.min_micro_batch_size]


def _pipeline_shapes(
    settings: SearchSettings, stages: int, replicas: int, num_blocks: int, chosen_rounds: bool = False
) -> list[tuple[int, int]]:
    """(micro-batches, stages per rank) the runtime can run for this layout: 1F1B needs a
    micro-batch per stage to fill the pipeline; interleaving needs whole rounds of S, and where
    the search chooses it (or zero bubble: ``chosen_rounds``), so must every batch of the epoch."""
    shapes = []
    for microbatches in _microbatch_counts(settings, replicas):
        every_batch = None  # computed where needed
        for virtual in _virtual_counts(settings, stages, microbatches, num_blocks):
            schedule = _schedule(settings, stages, microbatches, virtual)
            if schedule in ("1f1b", "zbv") and microbatches < stages:
                continue
            in_rounds = schedule != "zbv"  # ZB-V takes any count of at least S (``PartitionPlan.microbatches_for``)
            if settings.zero_bubble and (schedule == "gpipe" or (in_rounds and not rounds_fit(microbatches, stages))):
                continue
            if chosen_rounds or (virtual > 1 and settings.virtual_stages is None):
                if every_batch is None:
                    every_batch = _every_batch_in_rounds(settings, stages, replicas, microbatches, in_rounds)
                if not every_batch:
                    continue
            shapes.append((microbatches, virtual))
    return shapes


def _every_batch_in_rounds(
    settings: SearchSettings, stages: int, replicas: int, microbatches: int, in_rounds: bool = True
) -> bool:
    """Whether the epoch's last batch, where smaller, also splits into whole rounds of ``stages``
    micro-batches (``in_rounds``; else into at least ``stages``), as the runtime would split it
    (``PartitionPlan.microbatches_for``)."""
    if settings.epoch_samples is None:
        return False
    last = math.ceil(settings.epoch_samples / replicas) % _replica_batch(settings, replicas)
    if last == 0:
        return True
    try:
        choose_microbatches(last, microbatches, stages, stages if in_rounds else None)
    except PlanError:
        return False
    return True


_VIRTUAL_CHOICES = (2, 3, 4)
"""Stages per rank the search tries when interleaving is allowed and the count is not forced:
more shrink the bubble (about ``1 / V`` of 1F1B's) but send ``V`` times as often and hold
more micro-batches in flight."""


def _virtual_counts(settings: SearchSettings, stages: int, microbatches: int, num_blocks: int) -> list[int]:
    if settings.schedule == "zbv":  # two stages a rank, in a V over two ranks at least
        return [2] if stages > 1 and stages * 2 <= num_blocks and settings.virtual_stages in (None, 2) else []
    # One rank gains nothing from virtual stages (no bubble), but may be asked for them
    # (multi-stage code without point-to-point, e.g. on a single GPU).
    asked = settings.virtual_stages is not None
    may_interleave = settings.schedule in ("auto", "interleaved_1f1b") and (stages > 1 or asked)
    if settings.virtual_stages is not None:
        wanted = [settings.virtual_stages]
    else:
        wanted = [1, *_VIRTUAL_CHOICES] if may_interleave else [1]
    if settings.schedule == "interleaved_1f1b":
        wanted = [v for v in wanted if v > 1]
    fits = microbatches >= stages and microbatches % stages == 0
    return [v for v in wanted if v == 1 or (may_interleave and fits and stages * v <= num_blocks)]


def _schedule(settings: SearchSettings, stages: int, microbatches: int, virtual: int = 1) -> str:
    if settings.schedule == "zbv":
        return "zbv"
    if virtual > 1:
        return "interleaved_1f1b"
    if settings.schedule != "auto":
        return settings.schedule
    return "1f1b" if microbatches >= stages or settings.zero_bubble else "gpipe"


_GATHER_HOST_OPS = 4
"""Host operations of one ZeRO-3 unit's gather (allocate, copy on the holder, broadcast, split)."""


class _RangeTables:
    """Per block range ``i .. j-1``: parameter bytes and trainable bytes (a tensor used by
    several blocks of the range counts once), and the largest workspace."""

    def __init__(self, blocks: Sequence[BlockCost], tensors: TensorTable) -> None:
        self.tensors = tensors
        count = len(blocks)
        self.param_bytes = [[0] * (count + 1) for _ in range(count)]
        self.trainable_bytes = [[0] * (count + 1) for _ in range(count)]
        self.workspace_bytes = [[0] * (count + 1) for _ in range(count)]
        """The largest ``workspace_bytes`` of the range's blocks (at the reference size)."""
        self.largest_trainable = [[0] * (count + 1) for _ in range(count)]
        """The largest trainable tensor's bytes (a per-tensor optimizer's temporaries)."""
        self.weight_copies = _prefix([b.weight_copy_bytes for b in blocks])
        """Prefix sums of the blocks' half-precision parameter copies (shared by micro-batches)."""
        self.trainable_tensors = [[(0, 0)] * (count + 1) for _ in range(count)]
        """(trainable tensors, layers they are in): ZeRO-3 gathers them a layer and holder at a time."""
        self.trainable_sizes: list[list[int]] = []
        """From block ``i``: the trainable tensors' bytes, in the order the blocks first use them
        (range ``i .. j-1`` holds the first ``trainable_tensors[i][j][0]``)."""
        self._shares: dict[tuple[int, int, int], int] = {}
        for i in range(count):
            sizes: list[int] = []
            self.trainable_sizes.append(sizes)
            seen: set[str] = set()
            layers: set[str] = set()
            total = trainable = workspace = largest = trained = 0
            for j in range(i, count):
                workspace = max(workspace, blocks[j].workspace_bytes)
                self.workspace_bytes[i][j + 1] = workspace
                for name in blocks[j].tensor_names:
                    if name not in seen:
                        seen.add(name)
                        total += tensors.nbytes[name]
                        if name in tensors.trainable:
                            trainable += tensors.nbytes[name]
                            largest = max(largest, tensors.nbytes[name])
                            sizes.append(tensors.nbytes[name])
                            layers.add(layer_of(name))
                            trained += 1
                self.param_bytes[i][j + 1], self.trainable_bytes[i][j + 1] = total, trainable
                self.largest_trainable[i][j + 1] = largest
                self.trainable_tensors[i][j + 1] = (trained, len(layers))

    def busiest_share(self, i: int, j: int, replicas: int) -> int:
        """Trainable bytes of the busiest replica's share of range ``i .. j-1`` (whole tensors)."""
        key = (i, j, replicas)
        if key not in self._shares:
            sizes = self.trainable_sizes[i][: self.trainable_tensors[i][j][0]]
            self._shares[key] = busiest_share(sizes, replicas)
        return self._shares[key]


class _Layout:
    """Stage costs of one (stages, replicas, micro-batches) choice, for the DP."""

    def __init__(
        self,
        blocks: Sequence[BlockCost],
        ranges: _RangeTables,
        settings: SearchSettings,
        shape: tuple[int, int, int, int],
        factor: float,
        zero_stage: int = 1,
        offload: bool = False,
    ) -> None:
        self.blocks = [b.scaled(factor) for b in blocks]
        self.zero_stage = zero_stage
        self.offload = offload
        self.shards = shape[1] if zero_stage in (1, 2, 3) else 1
        """Replicas the optimizer state is split over."""
        self.factor = factor
        self.ranges, self.settings = ranges, settings
        self.stages, self.replicas, self.microbatches, self.virtual = shape
        self.pieces = self.stages * self.virtual
        """Stages of the split: ``stages`` ranks per pipeline, ``virtual`` stages per rank."""
        self.schedule = _schedule(settings, self.stages, self.microbatches, self.virtual)
        self.zero_bubble = bool(settings.zero_bubble)
        self.in_flight = in_flight(self.schedule, self.stages, self.microbatches, self.virtual, self.zero_bubble)
        self.weight_pending = (
            weight_passes_pending(self.stages, self.microbatches, self.virtual, self.schedule)
            if self.zero_bubble
            else [0] * self.pieces
        )
        self.fwd = _prefix([b.fwd_ms for b in self.blocks])
        self.bwd = _prefix([b.bwd_ms for b in self.blocks])
        self.act = _prefix([b.activation_bytes for b in self.blocks])
        self.optimizer_factor = optimizer_state_factor(settings.optimizer)
        self.link = [_link_bandwidth(settings, self.stages, self.replicas, p) / 1e3 for p in range(self.stages)]
        self.chosen_checkpoint: dict[tuple[int, int, int], int | None] = {}
        self.refined_checkpoint: dict[tuple[int, int, int], int] = {}
        self.starts = _layer_starts(blocks)
        self.regions = _LayerRegions(self.starts, self.act, self.cut_bytes)
        self.budget = self._stage_budgets()
        """Memory each stage may use: its rank's limit shared among the rank's stages."""
        self.spread_exchange = True
        """Count each stage's gradient exchange in its per-slot cost (see ``_plan_layout``)."""

    def _stage_budgets(self) -> list[float]:
        """A rank holds ``virtual`` stages, each checked on its own by the DP: each gets a share
        of the limit, so that the rank's stages together fit. Looped placements share it evenly.
        In ZB-V's V a rank's first stage holds the most micro-batches in flight and its second
        the fewest (``2S + 1`` together): the shares follow an even split's needs, its state and
        its activations times the micro-batches in flight."""
        usable = self.settings.usable_memory
        if self.schedule not in V_SHAPED:
            return [usable / self.virtual] * self.pieces
        count = len(self.blocks)
        trainable = self.ranges.trainable_bytes[0][count]
        optimizer = 0.0 if self.offload else self.optimizer_factor / self.shards
        state = self.ranges.param_bytes[0][count] + trainable * (1 + optimizer)
        need = [(state + self.act[count] * held) / self.pieces for held in self.in_flight]
        on_rank = [0.0] * self.stages
        for stage, stage_need in enumerate(need):
            on_rank[self.position(stage)] += stage_need
        return [usable * need[stage] / on_rank[self.position(stage)] for stage in range(self.pieces)]

    def cut_bytes(self, j: int) -> int:
        """Bytes crossing the cut before block ``j`` (0 at the ends of the graph)."""
        return self.blocks[j - 1].cut_bytes if 0 < j < len(self.blocks) else 0

    def position(self, stage: int) -> int:
        """The pipeline position running ``stage`` (``plan.stage_position``)."""
        return stage_position(stage, self.stages, self.schedule)

    def send_ms(self, stage: int, j: int) -> float:
        if j == len(self.blocks):
            return 0.0
        here, there = self.position(stage), self.position(stage + 1)
        if self.schedule in V_SHAPED:
            if here == there:  # the V's turn: the rank hands the values to its other stage
                return 0.0
            here = min(here, there)  # on the way back up, the link below
        return self.settings.device.link_latency_ms + self.cut_bytes(j) / self.link[here]

    def copy_ms(self, stage: int, i: int, j: int, received: bool = True) -> float:
        """What one pass of the stage (blocks ``i .. j-1``) spends moving its messages on its own
        cores, where sends occupy them (``DeviceSpec.sends_occupy_compute``): forward receives
        its input and sends its output, backward the gradients of both. ``received=False``:
        what it sends only."""
        if not self.settings.device.sends_occupy_compute:
            return 0.0
        latency = self.settings.device.link_latency_ms
        sends = [self.send_ms(stage, j)] + ([self.send_ms(stage - 1, i)] if received and stage > 0 else [])
        return sum(max(0.0, ms - latency) for ms in sends)

    def spans_of(self, spans: Sequence[tuple[int, int]], position: int) -> list[tuple[int, int]]:
        """The block spans of the stages that the rank at ``position`` runs."""
        return [span for stage, span in enumerate(spans) if self.position(stage) == position]

    def compute_ms(self, i: int, j: int, recompute: int) -> tuple[float, float]:
        """Forward and backward of one micro-batch, with the runtime's overhead per action;
        backward recomputes the forward of the stage's first ``recompute`` blocks, whose first
        forward costs a little more (``DeviceSpec.checkpointed_forward_share``)."""
        device = self.settings.device
        recompute_ms = self.recompute_ms(i, recompute)
        fwd = self.fwd[j] - self.fwd[i] + device.checkpointed_forward_share * recompute_ms
        bwd = self.bwd[j] - self.bwd[i]
        gather_fwd, gather_bwd = self.gather_ms(i, j, fwd), self.gather_ms(i, j, bwd + recompute_ms, passes=2)
        overhead = device.action_overhead_ms
        return fwd + overhead + gather_fwd, bwd + recompute_ms + overhead + gather_bwd

    def backward_passes(self, i: int, j: int, recompute: int) -> tuple[float, float]:
        """Zero bubble: the input and weight passes of one micro-batch (``split_backward``)."""
        bwd = self.compute_ms(i, j, recompute)[1]
        overhead = self.settings.device.action_overhead_ms
        nodes = self.blocks[j - 1].end - self.blocks[i].start
        return split_backward(bwd, self.recompute_ms(i, recompute), overhead, nodes, first=i == 0)

    def slot_compute_ms(self, i: int, j: int, recompute: int) -> float:
        """Forward and backward of one micro-batch, both passes of a split backward included."""
        fwd, bwd = self.compute_ms(i, j, recompute)
        return fwd + (sum(self.backward_passes(i, j, recompute)) if self.zero_bubble else bwd)

    def gather_ms(self, i: int, j: int, compute_ms: float, passes: int = 1) -> float:
        """ZeRO-3, per micro-batch: what the stage's gathers add to a pass computing for
        ``compute_ms`` (``passes=2``: backward, which gathers every unit again and reduces its
        gradients). The runtime gathers a unit at a time (a layer's tensors with one holder:
        about ``min(tensors, layers x D)`` of them) where the graph first uses it. Each unit
        costs host work (``DeviceSpec.gather_overhead_ms``: on the 2-core CPU about 0.8 ms); its
        transfer (a broadcast's latency and the bytes) runs while the unit before it computes
        (the runtime prefetches), so only the first unit's, or what the pass's compute cannot
        cover, shows."""
        if self.zero_stage != 3 or self.replicas == 1:
            return 0.0
        device = self.settings.device
        bandwidth = device.link_bandwidth(self.stages * self.replicas > self.settings.devices_per_node) / 1e3
        share = (self.replicas - 1) / self.replicas
        tensors, layers = self.ranges.trainable_tensors[i][j]
        units = min(tensors, layers * self.replicas)
        # A broadcast's latency: a tree of point-to-point messages (not the all-reduce's fitted
        # latency: two sizes timed on busy cores scatter from 0.4 to 3 ms here).
        latency = device.link_latency_ms * math.ceil(math.log2(self.replicas))
        host = units * (device.gather_overhead_ms + _GATHER_HOST_OPS * device.op_overhead_ms)
        transfer = passes * (units * latency + share * self.ranges.trainable_bytes[i][j] / bandwidth)
        exposed = max(transfer / max(units, 1), transfer - compute_ms)
        return passes * host + exposed

    def per_layer(self, stage: int, i: int, recompute: int) -> bool:
        """Whether the first ``recompute`` blocks from block ``i`` recompute as one checkpoint
        region per layer rather than one for all. Per layer, each layer's input stays for every
        micro-batch in flight, and backward recomputes one layer of one micro-batch at a time; as
        one region, only the first input stays, and backward recomputes all of them at once. The
        smaller wins: per layer where few micro-batches are in flight (data parallelism)."""
        end = i + recompute
        inputs = self.regions.boundary_bytes(i, end)
        if not inputs:
            return False
        whole = self.act[end] - self.act[i]
        return self.in_flight[stage] * inputs + self.regions.largest(i, end) < whole

    def recompute_cuts(self, stage: int, i: int, recompute: int) -> list[int]:
        """The blocks where a new checkpoint region starts (``per_layer``), else none."""
        return self.regions.inside(i, i + recompute) if self.per_layer(stage, i, recompute) else []

    def recompute_ms(self, i: int, recompute: int) -> float:
        """Forward time of the first ``recompute`` blocks from block ``i``, run again in backward."""
        return self.fwd[i + recompute] - self.fwd[i]

    def optimizer_ms(self, i: int, j: int) -> float:
        """The optimizer step over the stage's share of parameters: memory-bound, it reads the
        parameters, gradients and state and writes the parameters and state once."""
        passes = 3 + 2 * self.optimizer_factor
        share = self.share(i, j) if self.shards > 1 else self.ranges.trainable_bytes[i][j]
        device = self.settings.device
        if not self.offload:
            return passes * share / device.memory_bandwidth * 1e3
        # Offloaded: the host steps, after the parameters and gradients were copied to it, then
        # the new parameters are copied back (three copies of the share over the host link).
        host_step = device.host_step_bandwidth or device.memory_bandwidth
        host_link = device.host_bandwidth or device.memory_bandwidth
        return (passes * share / host_step + 3 * share / host_link) * 1e3

    def share(self, i: int, j: int) -> int:
        """Trainable bytes of the busiest replica's share of the stage (whole tensors). With
        several stages a rank the runtime shares the rank's tensors together
        (``PipelineEngine._ownership``); each stage is checked here on its own, as its memory is."""
        return self.ranges.busiest_share(i, j, self.replicas)

    def memory(self, stage: int, i: int, j: int, recompute: int) -> StageMemory:
        """The stage's peak when its first ``recompute`` blocks recompute their activations
        (all of them: the whole stage is checkpointed)."""
        copies = int(self.ranges.weight_copies[j] - self.ranges.weight_copies[i])
        whole = recompute == j - i
        kept, recomputed = int(self.act[j] - self.act[i + recompute]), int(self.act[i + recompute] - self.act[i])
        if 0 < recompute < j - i:  # the values crossing into the kept blocks stay too (on the safe side)
            kept += self.cut_bytes(i + recompute)
            if self.per_layer(stage, i, recompute):
                kept += int(self.regions.boundary_bytes(i, i + recompute))
                recomputed = int(self.regions.largest(i, i + recompute))
        if self.zero_stage == 3 and self.replicas > 1:
            # Autocast casts a gathered parameter anew at each use (it caches casts of leaves
            # only), and backward keeps the cast: one copy per micro-batch in flight.
            copies *= self.in_flight[stage]
        return stage_memory(
            param_bytes=self.ranges.param_bytes[i][j] + copies,
            trainable_bytes=self.ranges.trainable_bytes[i][j],
            activation_bytes=recomputed if whole else kept,
            input_bytes=self.cut_bytes(i),
            output_bytes=self.cut_bytes(j),
            in_flight=self.in_flight[stage],
            num_microbatches=self.microbatches,
            checkpoint=whole,
            recomputed_bytes=0 if whole else recomputed,
            optimizer_factor=self.optimizer_factor,
            num_replicas=self.replicas,
            shard_optimizer=self.zero_stage in (1, 2, 3),
            workspace_bytes=int(self.ranges.workspace_bytes[i][j] * self.factor),
            ddp=self.ddp,
            # torch's optimizers default to foreach (one temporary as large as the state) on GPUs,
            # to a loop over the tensors on the CPU
            largest_trainable_bytes=None if self.settings.device.name != "cpu" else self.ranges.largest_trainable[i][j],
            zero_bubble=self.zero_bubble,
            accumulating=self.settings.accumulating,
            shard_gradients=self.zero_stage == 2 and self.replicas > 1,
            offload_optimizer=self.offload,
            shard_parameters=self.zero_stage == 3 and self.replicas > 1,
            largest_param_bytes=self.ranges.largest_trainable[i][j],
            weight_pending=self.weight_pending[stage],
            # torch's runtime schedules hold their sends to the step's end; one rank sends nothing
            sends_held=(self.zero_bubble or self.virtual > 1) and self.stages > 1,
            share_bytes=self.share(i, j),
        )

    @property
    def ddp(self) -> bool:
        """The replicas average gradients through DDP, during the last backward
        (``runtime/pipeline.py``); zero bubble and ZeRO-2 exchange them after the schedule."""
        return self.replicas > 1 and not self.zero_bubble and self.zero_stage not in (2, 3)

    def checkpoint_choice(self, stage: int, i: int, j: int) -> int | None:
        """For the DP: none of the stage's blocks recompute (0) or all of them (``j - i``: the
        whole stage is checkpointed); where neither fits, the fewest first layers that make it fit
        (each recomputed layer its own checkpoint: with one micro-batch in flight, checkpointing
        the whole stage as one saves nothing); None when nothing fits. A split checkpointed whole
        is refined afterwards (``least_recompute``): bisecting every range of the DP would make
        the search several times slower."""
        key = (stage, i, j)
        if key not in self.chosen_checkpoint:
            forced = self.settings.activation_checkpointing
            options = [0, j - i] if forced is None else [j - i if forced else 0]
            usable = self.budget[stage]
            choice, least = None, math.inf
            for k in options:
                memory = self.memory(stage, i, j, k)
                if memory.total <= usable:
                    choice = k
                    break
                least = min(least, memory.params + memory.optimizer)  # what no recomputation frees
            if choice is None and self._selective and j - i > 1 and least <= usable:
                if self._fits(stage, i, j, j - i - 1):
                    choice = self._fewest_recomputed(stage, i, j, j - i - 1)
            self.chosen_checkpoint[key] = choice
        return self.chosen_checkpoint[key]

    @property
    def _selective(self) -> bool:
        return self.settings.activation_checkpointing is None and self.settings.selective_checkpointing

    def _fits(self, stage: int, i: int, j: int, recompute: int) -> bool:
        usable = self.budget[stage]
        return self.memory(stage, i, j, recompute).total <= usable

    def least_recompute(self, stage: int, i: int, j: int) -> int | None:
        """The fewest first blocks to recompute (the least time) that make the stage fit: none,
        the whole stage, or with ``activation_checkpointing="auto"`` the first layers only
        (selective checkpointing), ending at a layer boundary where one fits."""
        choice = self.checkpoint_choice(stage, i, j)
        if choice != j - i or not self._selective or j - i == 1:
            return choice
        key = (stage, i, j)
        if key not in self.refined_checkpoint:
            self.refined_checkpoint[key] = self._fewest_recomputed(stage, i, j, j - i)
        return self.refined_checkpoint[key]

    def _fewest_recomputed(self, stage: int, i: int, j: int, most: int) -> int:
        """The fewest first blocks, at most ``most`` (which fit), whose recomputation makes the
        stage fit, moved on to the next layer boundary that still fits."""
        low, high = 1, most  # memory falls as more blocks recompute: the first count that fits
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if self._fits(stage, i, j, middle) else (middle + 1, high)
        if not self._fits(stage, i, j, low):  # not monotone here (a wide cut): all of ``most``
            return most
        layer_end = next((c for c in range(i + low, j) if self.starts[c] and self._fits(stage, i, j, c - i)), None)
        return low if layer_end is None else layer_end - i

    def least_memory(self, stage: int, i: int, j: int) -> float:
        """The stage's memory with checkpointing if allowed (for "what would fit" advice)."""
        whole = self.settings.activation_checkpointing is not False
        least = self.memory(stage, i, j, j - i if whole else 0).total
        if self._selective and j - i > 1:  # every layer but the last its own checkpoint
            least = min(least, self.memory(stage, i, j, j - i - 1).total)
        return float(least)

    def lower_bound(self, stage: int, i: int, j: int) -> float:
        """The stage's cost without checkpointing and without what it receives (which depends on
        where it starts): grows with every block added."""
        return self.slot_compute_ms(i, j, 0) + self._other_ms(stage, i, j, received=False)

    def stage_cost(self, stage: int, i: int, j: int) -> float:
        """Time per micro-batch slot: compute, the sends of activations and gradients, and the
        stage's share of the gradient exchange. A step is about ``M + S - 1`` slots of the slowest
        stage plus one exchange, so the exchange counts as ``1 / (M + S - 1)`` of it per slot."""
        recompute = self.checkpoint_choice(stage, i, j)
        if recompute is None:
            return math.inf
        return self.slot_compute_ms(i, j, recompute) + self._other_ms(stage, i, j)

    def refined_cost(self, stage: int, i: int, j: int) -> float:
        """``stage_cost`` with the recomputation the plan will have (``least_recompute``: the
        DP costs a stage checkpointed whole, which is refined to its first layers afterwards)."""
        recompute = self.least_recompute(stage, i, j)
        if recompute is None:
            return math.inf
        return self.slot_compute_ms(i, j, recompute) + self._other_ms(stage, i, j)

    def _other_ms(self, stage: int, i: int, j: int, received: bool = True) -> float:
        slots = self.virtual * self.microbatches + self.stages - 1
        exchange = _exchange_ms(self, i, j) / slots if self.spread_exchange else 0.0
        sends = self.send_ms(stage, j)
        if self.settings.device.sends_occupy_compute:
            sends = self.copy_ms(stage, i, j, received)
        return 2 * sends + exchange


class _LayerRegions:
    """Block ranges cut at layer starts, for per-layer checkpoint regions: the starts inside a
    range, the bytes crossing them, and the largest region's activations, each in O(log L)
    (the DP asks for every range of every stage)."""

    def __init__(self, starts: Sequence[bool], act: Sequence[float], cut_bytes: Callable[[int], int]) -> None:
        self.starts = [c for c, first in enumerate(starts) if first]
        self.act = act
        edges = [*self.starts, len(starts)]
        self.table = [[act[b] - act[a] for a, b in zip(edges, edges[1:])]]
        """``table[k][t]``: the largest of layers ``t .. t + 2^k - 1`` (a sparse table)."""
        while 2 ** len(self.table) <= len(self.table[0]):
            row, width = self.table[-1], 2 ** (len(self.table) - 1)
            self.table.append([max(row[t], row[t + width]) for t in range(len(row) - width)])
        self.crossing = _prefix([cut_bytes(c) for c in self.starts])

    def _within(self, i: int, end: int) -> tuple[int, int]:
        """Indices into ``starts`` of the layer starts strictly inside blocks ``i .. end``."""
        return bisect.bisect_right(self.starts, i), bisect.bisect_left(self.starts, end)

    def inside(self, i: int, end: int) -> list[int]:
        low, high = self._within(i, end)
        return self.starts[low:high]

    def boundary_bytes(self, i: int, end: int) -> float:
        low, high = self._within(i, end)
        return self.crossing[high] - self.crossing[low]

    def largest(self, i: int, end: int) -> float:
        """Activations of the largest region: the part-layers at both ends, or a whole one between."""
        low, high = self._within(i, end)
        if low == high:
            return self.act[end] - self.act[i]
        ends = max(self.act[self.starts[low]] - self.act[i], self.act[end] - self.act[self.starts[high - 1]])
        if high - 1 == low:
            return ends
        level = (high - 1 - low).bit_length() - 1
        row = self.table[level]
        return max(ends, row[low], row[high - 1 - 2**level])


def _state_exceeds_devices(layout: _Layout) -> bool:
    """Whether the parameters, their gradients and the optimizer state alone exceed the memory
    of a pipeline's ranks, whatever the split: every stage holds at least these, so the DP (the
    search's cost) need not run. Most layouts of a huge model end here. A lower bound: shares
    are counted as even splits (a stage's busiest replica holds more, ``_Layout.share``)."""
    ranges, count = layout.ranges, len(layout.blocks)
    state = 0.0 if layout.offload else layout.optimizer_factor / layout.shards
    trainable = ranges.trainable_bytes[0][count]
    # The parameters and their gradients, all of them, or with ZeRO-3 a replica's share.
    held = trainable // layout.replicas if layout.zero_stage == 3 else trainable
    least = ranges.param_bytes[0][count] - trainable + 2 * held + trainable * state
    return least > layout.stages * layout.settings.usable_memory


_Split = tuple[PartitionPlan, ScheduleTimes, list[int]]
"""A simulated plan and its block boundaries."""


def _plan_layout(layout: _Layout) -> _Split | None:
    """The best split of one layout. The DP balances one number per stage, but a step pays the
    gradient exchange once, for the largest stage: balancing with the exchange spread over the
    slots can lose to balancing compute alone (a huge embedding stage), so both are simulated."""
    plans = []
    for spread_exchange in (True, False):
        layout.spread_exchange = spread_exchange
        found = min_max_partition(len(layout.blocks), layout.pieces, layout.stage_cost, layout.lower_bound)
        if found is not None:
            bounds = _snap_to_layers(layout, found[0], found[1])
            plans.append((*_layout_plan(layout, bounds), bounds))
            balanced = _balance_ranks(layout, bounds) if layout.virtual > 1 else _balance_refined(layout, bounds)
            if balanced is not None:
                plans.append((*_layout_plan(layout, balanced), balanced))
        if found is None or layout.replicas == 1:  # no replicas, no exchange: one DP says it all
            break
    return min(plans, key=lambda p: p[0].predicted_step_ms, default=None)


_SETTLE_TRIALS = 64
"""Splits simulated at most when a split settles on the simulated step: a sweep over a 64-stage
pipeline of 96 micro-batches simulates 126 splits, about 2 s on the 2-core CPU."""


def _settle_on_schedule(layout: _Layout, split: _Split) -> _Split:
    """The DP balances a per-slot cost, the step is the simulated schedule: where stages nearly
    tie for the bottleneck, which of them is heavier and where it sits in the pipeline changes
    the step (the heavier stage first or last under 1F1B), and a cut snapped to a layer boundary
    within 1% of the DP's cost can be 4% slower simulated (random 2-stage chains). Each cut in
    turn moves a block earlier or later while that shortens the simulated step and every stage
    fits; then a cut so moved inside a layer goes to the layer's boundary where that costs at
    most ``_SNAP_TOLERANCE`` of the simulated step, and no more than settling gained (the split
    it started from is kept otherwise). Run on a search's winning layout only, and
    for at most ``_SETTLE_TRIALS`` simulations: each simulates the whole schedule."""
    best, trials, moved = split, 0, set()
    while trials < _SETTLE_TRIALS:
        improved = False
        for k in range(1, len(best[2]) - 1):
            for cut in (best[2][k] - 1, best[2][k] + 1):
                found = _simulated_cut(layout, best[2], k, cut)
                trials += found is not None
                if found is not None and found[0].predicted_step_ms < best[0].predicted_step_ms:
                    best, improved = found, True
                    moved.add(k)
                    break
            if trials >= _SETTLE_TRIALS:
                break
        if not improved:
            break
    limit = best[0].predicted_step_ms * (1 + _SNAP_TOLERANCE)
    for k in sorted(moved):
        bounds = best[2]
        if layout.starts[bounds[k]]:
            continue
        before = next((c for c in range(bounds[k] - 1, bounds[k - 1], -1) if layout.starts[c]), None)
        after = next((c for c in range(bounds[k] + 1, bounds[k + 1]) if layout.starts[c]), None)
        snapped = [_simulated_cut(layout, bounds, k, c) for c in (before, after) if c is not None]
        fitting = [found for found in snapped if found is not None and found[0].predicted_step_ms <= limit]
        if fitting:
            best = min(fitting, key=lambda found: found[0].predicted_step_ms)
    # Snapping may give back up to 1%: never end slower than the split it started from.
    return best if best[0].predicted_step_ms <= split[0].predicted_step_ms else split


def _simulated_cut(layout: _Layout, bounds: list[int], k: int, cut: int) -> _Split | None:
    """The split with cut ``k`` at block ``cut``; None if a stage would be empty or not fit."""
    if not bounds[k - 1] < cut < bounds[k + 1]:
        return None
    trial = [*bounds[:k], cut, *bounds[k + 1 :]]
    if any(layout.least_recompute(s, i, j) is None for s, (i, j) in enumerate(zip(trial, trial[1:]))):
        return None
    return (*_layout_plan(layout, trial), trial)


_SNAP_TOLERANCE = 0.01
"""A cut moves to a layer boundary when that makes its two stages at most 1% slower than the
best split's bottleneck: plans then read "blocks.0-11 | blocks.12-23" instead of cutting a
layer in two for a gain nobody would measure."""


def _snap_to_layers(
    layout: _Layout, bounds: list[int], bottleneck: float, cost: Callable[[int, int, int], float] | None = None
) -> list[int]:
    cost = cost or layout.stage_cost
    starts = _layer_starts(layout.blocks)
    limit = bottleneck * (1 + _SNAP_TOLERANCE)
    bounds = list(bounds)
    for k in range(1, len(bounds) - 1):
        if starts[bounds[k]]:
            continue
        low, high = bounds[k - 1] + 1, bounds[k + 1] - 1
        candidates = sorted((c for c in range(low, high + 1) if starts[c]), key=lambda c: abs(c - bounds[k]))
        for cut in candidates:
            costs = (cost(k - 1, bounds[k - 1], cut), cost(k, cut, bounds[k + 1]))
            if max(costs) <= limit:
                bounds[k] = cut
                break
    return bounds


_RANK_IMBALANCE = 0.02
"""Ranks whose loads differ from their mean by less than this are left as the DP split them."""


def _balance_refined(layout: _Layout, bounds: list[int]) -> list[int] | None:
    """The DP costs a stage that recomputes as checkpointed whole; the plan recomputes only its
    first layers where that fits (``least_recompute``), so the split the DP balanced may not be
    balanced any more: GPT 6.7B on 2 x 1 x 64 H100s (``planner_baselines.py``) cut its first
    stage a layer later than an even split and ran 3% slower (a cut a layer earlier made it
    fit checkpointed whole in the DP's eyes, then only its first layers recomputed). The cuts
    move as ``_balance_ranks`` moves them, to any block, with the refined costs."""
    if layout.stages == 1 or layout.settings.activation_checkpointing is not None:
        return None  # nothing to move, or nothing refined
    balanced = _balance_ranks(layout, bounds, layout.refined_cost, layers_only=False)
    if balanced is None:
        return None
    bottleneck = max(layout.refined_cost(s, i, j) for s, (i, j) in enumerate(zip(balanced, balanced[1:])))
    snapped = _snap_to_layers(layout, balanced, bottleneck, layout.refined_cost)
    return None if snapped == bounds else snapped


def _balance_ranks(
    layout: _Layout,
    bounds: list[int],
    cost: Callable[[int, int, int], float] | None = None,
    layers_only: bool = True,
) -> list[int] | None:
    """With several stages a rank, a rank runs the sum of its stages, but the DP balances the
    stages one by one: where one block sets its bottleneck (a huge head), the other stages fall
    anywhere under it, and one rank can carry far more than another. Move one cut at a time, to
    a layer boundary, where that lowers the ranks' loads (the busiest first, then the next), while
    every stage fits; until no move helps. None when the ranks are already within
    ``_RANK_IMBALANCE`` of their mean, or nothing moved. ``cost``: a stage's (``stage_cost``);
    ``layers_only``: cuts move to layer boundaries only."""
    cost = cost or layout.stage_cost
    costs = [cost(s, i, j) for s, (i, j) in enumerate(zip(bounds, bounds[1:]))]

    def loads(stage_costs: Sequence[float]) -> tuple[float, ...]:
        per_rank = [0.0] * layout.stages
        for stage, cost in enumerate(stage_costs):
            per_rank[layout.position(stage)] += cost
        return tuple(sorted(per_rank, reverse=True))

    current = loads(costs)
    if current[0] <= (1 + _RANK_IMBALANCE) * sum(current) / len(current):
        return None
    bounds, moved = list(bounds), False
    for _ in range(len(layout.blocks)):  # each pass moves a cut, or ends; bounded all the same
        best: tuple[tuple[float, ...], int, int, float, float] | None = None
        for k in range(1, len(bounds) - 1):
            for cut in range(bounds[k - 1] + 1, bounds[k + 1]):
                if cut == bounds[k] or (layers_only and not layout.starts[cut]):
                    continue
                left, right = cost(k - 1, bounds[k - 1], cut), cost(k, cut, bounds[k + 1])
                if math.isinf(left) or math.isinf(right):
                    continue
                trial = loads([*costs[: k - 1], left, right, *costs[k + 1 :]])
                if trial < (best[0] if best else current):
                    best = (trial, k, cut, left, right)
        if best is None:
            break
        trial, k, cut, left, right = best
        current, bounds[k], costs[k - 1], costs[k], moved = trial, cut, left, right, True
    return bounds if moved else None


def _layer_starts(blocks: Sequence[BlockCost]) -> list[bool]:
    """Whether block ``b`` starts another layer than block ``b - 1`` ends in (``blocks.3`` after
    ``blocks.2.mlp``; ``modules.layer_of``)."""
    heads = [[layer_of(p) for p in (b.module_paths or ("",))] for b in blocks]
    return [True] + [heads[b][0] != heads[b - 1][-1] for b in range(1, len(blocks))]


def _make_layout(
    blocks: Sequence[BlockCost],
    ranges: _RangeTables,
    settings: SearchSettings,
    shape: tuple[int, int, int, int],
    reference: int,
    zero_stage: int | None = None,
    offload: bool | None = None,
) -> _Layout:
    """``shape``: (stages, replicas, micro-batches, stages per rank); ``zero_stage`` and
    ``offload``: the settings' (when the search chooses: ZeRO-1, and offload where allowed, for
    the least memory)."""
    stages, replicas, microbatches, _ = shape
    microbatch_size = _replica_batch(settings, replicas) // microbatches
    if zero_stage is None:
        zero_stage = 1 if settings.zero_stage is None else settings.zero_stage
    if offload is None:
        offload = settings.offload_optimizer is not False
    return _Layout(blocks, ranges, settings, shape, microbatch_size / reference, zero_stage, offload)


def evaluate_split(
    blocks: Sequence[BlockCost],
    bounds: Sequence[int],
    *,
    replicas: int,
    microbatches: int,
    reference_microbatch_size: int,
    settings: SearchSettings,
    tensors: TensorTable,
) -> tuple[PartitionPlan, ScheduleTimes] | None:
    """Predict a given split (block boundaries ``[0, ..., B]``) with the search's models, e.g. to
    compare other partitioners; None if a stage does not fit in memory."""
    ranges = _RangeTables(blocks, tensors)
    shape = (len(bounds) - 1, replicas, microbatches, 1)
    layout = _make_layout(
        blocks, ranges, settings, shape, reference_microbatch_size, offload=settings.offload_optimizer is True
    )
    if any(layout.stage_cost(s, i, j) == math.inf for s, (i, j) in enumerate(zip(bounds, bounds[1:]))):
        return None
    return _layout_plan(layout, list(bounds))


def _layout_plan(layout: _Layout, bounds: list[int]) -> tuple[PartitionPlan, ScheduleTimes]:
    spans = list(zip(bounds, bounds[1:]))
    checkpoints = [layout.least_recompute(s, i, j) or 0 for s, (i, j) in enumerate(spans)]
    copies = [layout.copy_ms(s, i, j) for s, (i, j) in enumerate(spans)]
    times = [layout.compute_ms(i, j, c) for (i, j), c in zip(spans, checkpoints)]
    forwards = [f + copy for (f, _), copy in zip(times, copies)]
    backwards, weights = [b + copy for (_, b), copy in zip(times, copies)], None
    if layout.zero_bubble:  # the input pass sends the input's gradient
        halves = [layout.backward_passes(i, j, c) for (i, j), c in zip(spans, checkpoints)]
        backwards, weights = [i + copy for (i, _), copy in zip(halves, copies)], [w for _, w in halves]
    simulated = simulate_schedule(
        forwards,
        backwards,
        [layout.send_ms(s, j) for s, (_, j) in enumerate(spans)],
        layout.microbatches,
        layout.schedule,
        layout.virtual,
        weights,
    )
    exchange = _visible_exchange(layout, spans, simulated)
    update = max(_per_rank(layout, spans, layout.optimizer_ms)) + layout.settings.device.step_overhead_ms
    plan = PartitionPlan(
        graph_fingerprint="",
        world_size=layout.stages * layout.replicas,
        num_microbatches=layout.microbatches,
        microbatch_size=_replica_batch(layout.settings, layout.replicas) // layout.microbatches,
        stages=[_stage_plan(layout, s, i, j, c) for s, ((i, j), c) in enumerate(zip(spans, checkpoints))],
        schedule=layout.schedule,
        num_replicas=layout.replicas,
        virtual_stages=layout.virtual,
        zero_stage=layout.zero_stage,
        offload_optimizer=layout.offload,
        zero_bubble=layout.zero_bubble,
        predicted_step_ms=simulated.makespan_ms + exchange + update,
        predicted_bubble=simulated.bubble,
        predicted_exchange_ms=exchange,
        predicted_update_ms=update,
        predicted_action_overhead_ms=layout.settings.device.action_overhead_ms,
    )
    return plan, simulated


def _per_rank(layout: _Layout, spans: Sequence[tuple[int, int]], cost: Callable[[int, int], float]) -> list[float]:
    """``cost`` of each rank's stages summed (one stage per rank unless interleaved)."""
    return [sum(cost(i, j) for i, j in layout.spans_of(spans, p)) for p in range(layout.stages)]


def _stage_plan(layout: _Layout, stage: int, i: int, j: int, recompute: int) -> StagePlan:
    blocks = layout.blocks[i:j]
    names = list(dict.fromkeys(n for b in blocks for n in b.tensor_names))
    overhead = layout.settings.device.action_overhead_ms  # the stage's own compute is reported
    fwd, bwd = (t - overhead for t in layout.compute_ms(i, j, recompute))
    partial = 0 < recompute < j - i
    return StagePlan(
        stage_index=stage,
        ranks=stage_ranks(stage, layout.stages, layout.replicas, layout.schedule),
        node_start=blocks[0].start,
        node_end=blocks[-1].end,
        module_span=describe_span([p for b in blocks for p in b.module_paths]),
        tensor_names=names,
        num_params=sum(layout.ranges.tensors.numel[n] for n in names),
        fwd_ms=fwd,
        bwd_ms=bwd,
        param_bytes=layout.ranges.param_bytes[i][j],
        activation_bytes=int(layout.act[j] - layout.act[i]),
        send_bytes=layout.cut_bytes(j),
        send_ms=layout.send_ms(stage, j),
        checkpoint=recompute == j - i,
        recompute_end=blocks[recompute].start if partial else None,
        recompute_span=describe_span([p for b in blocks[:recompute] for p in b.module_paths]) if partial else "",
        recompute_ms=layout.recompute_ms(i, recompute),
        recompute_cuts=[blocks[c - i].start for c in layout.recompute_cuts(stage, i, recompute)] if partial else [],
        memory=layout.memory(stage, i, j, recompute).as_dict(),
    )


def _exchange_ms(layout: _Layout, i: int, j: int) -> float:
    """The whole gradient exchange of a stage over its replicas (both parts of ``_exchange_parts``)."""
    return sum(_exchange_parts(layout, i, j))


def _exchange_parts(layout: _Layout, i: int, j: int) -> tuple[float, float]:
    """The gradient exchange of the stage of blocks ``i .. j-1``: (what DDP runs during the last
    backward, what runs after the schedule or the optimizer step).

    - ZeRO-0: DDP's all-reduce.
    - ZeRO-1: DDP's all-reduce, then the updated shares sent to the others (``_shares_sent_ms``).
    - ZeRO-2: each replica's share of the gradients reduced to it after the schedule, one share
      after another (``runtime/pipeline.py``), then the updated shares sent as in ZeRO-1.
    - ZeRO-3: nothing; its gathers and reduces run in every micro-batch (``_Layout.gather_ms``).
    - Zero bubble runs its all-reduce after the schedule too.

    The all-reduce is timed as measured at startup when it was, else as a ring over the links
    (``2 (D-1)/D`` of the bytes).
    """
    replicas = layout.replicas
    if replicas == 1:
        return 0.0, 0.0
    device = layout.settings.device
    grads = layout.ranges.trainable_bytes[i][j]
    if device.allreduce_bandwidth is not None:
        allreduce = device.allreduce_latency_ms + grads / device.allreduce_bandwidth * 1e3
    else:
        across = layout.stages * replicas > layout.settings.devices_per_node
        share = (replicas - 1) / replicas
        allreduce = device.link_latency_ms + 2 * share * grads / (device.link_bandwidth(across) / 1e3)
    if layout.zero_stage == 3:  # reduced during backward (``_Layout.gather_ms``); nothing to share after
        return 0.0, 0.0
    if layout.zero_stage == 2:
        return 0.0, 2 * _shares_sent_ms(layout, grads)
    broadcast = _shares_sent_ms(layout, grads) if layout.zero_stage == 1 else 0.0
    if not layout.ddp:
        return 0.0, allreduce + broadcast
    return allreduce, broadcast


def _shares_sent_ms(layout: _Layout, nbytes: int) -> float:
    """One collective per replica's share of ``nbytes`` (a reduce to its owner, or the owner's
    broadcast of what it updated), one after another, each share flattened into one buffer and
    copied back (``runtime/optim.py``'s ``broadcast_from_owners``).

    Each collective moves its share at the link's bandwidth (a pipelined ring or tree), so the
    shares together take ``nbytes / bandwidth``, not the ``(D-1)/D`` of it an all-gather would;
    the copies read and write the bytes twice. Measured with gloo on the 2-core machine for
    6.5 MB over 2 ranks: two broadcasts 2.6 ms, two reduces 4.8 ms (the sums), against a
    one-way send of 3.25 MB in 1.45 ms; in the training step (traced, developer session 25) the
    broadcast after ZeRO-1's step 4.8-6.9 ms and ZeRO-2's reduce and broadcast about 14 ms,
    where one all-reduce (6.3 ms) had been charged."""
    device = layout.settings.device
    across = layout.stages * layout.replicas > layout.settings.devices_per_node
    sends = layout.replicas * device.link_latency_ms + nbytes / device.link_bandwidth(across) * 1e3
    return sends + 4 * nbytes / device.memory_bandwidth * 1e3


_DDP_FIRST_BUCKET_BYTES = 2**20
_DDP_BUCKET_BYTES = 25 * 2**20
"""DDP's default bucket sizes (``bucket_cap_mb=25``, a first bucket of 1 MiB): a bucket is
all-reduced once the backward has made all of its gradients."""


def _visible_exchange(layout: _Layout, spans: Sequence[tuple[int, int]], times: ScheduleTimes) -> float:
    """The time the gradient exchange adds after the schedule's last operation.

    Each rank's exchange starts when its own schedule ends, so a later stage's overlaps the
    earlier stages' drain. DDP all-reduces bucket by bucket during the last backward: only what
    that backward cannot cover shows, and at least the last bucket (the first layers'
    gradients, ready only at its end)."""
    if layout.replicas == 1:
        return 0.0
    visible = 0.0
    for position in range(layout.stages):
        operations = times.operations[position]
        end, last_backward = (operations[-1][3], operations[-1][3] - operations[-1][2]) if operations else (0.0, 0.0)
        rank_spans = layout.spans_of(spans, position)
        during = sum(_exchange_parts(layout, i, j)[0] for i, j in rank_spans)
        after = sum(_exchange_parts(layout, i, j)[1] for i, j in rank_spans)
        grads = sum(layout.ranges.trainable_bytes[i][j] for i, j in rank_spans)
        shown = max(during - last_backward, during * _last_bucket_share(grads))
        visible = max(visible, end - times.makespan_ms + shown + after)
    return max(visible, 0.0)


def _last_bucket_share(grad_bytes: int) -> float:
    """Share of the gradients in DDP's last bucket (the one that waits for the whole backward)."""
    if grad_bytes <= _DDP_FIRST_BUCKET_BYTES:
        return 1.0
    rest = grad_bytes - _DDP_FIRST_BUCKET_BYTES
    return ((rest - 1) % _DDP_BUCKET_BYTES + 1) / grad_bytes


def _link_bandwidth(settings: SearchSettings, stages: int, replicas: int, position: int) -> float:
    """Bytes/s from pipeline position ``position`` to the next: inter-node if any replica's pair
    of ranks straddles a node boundary."""
    per_node = settings.devices_per_node
    across = any(
        (d * stages + position) // per_node != (d * stages + position + 1) // per_node for d in range(replicas)
    )
    return settings.device.link_bandwidth(across and position + 1 < stages)


def _prefix(values: Sequence[float]) -> list[float]:
    total, out = 0.0, [0.0]
    for value in values:
        total += value
        out.append(total)
    return out


def _infeasible(
    blocks: Sequence[BlockCost],
    ranges: _RangeTables,
    settings: SearchSettings,
    reference: int,
    candidates: list[Candidate],
) -> PlanError:
    if not candidates:
        batch = (
            f"the batch of {settings.replica_batch_size} per replica"
            if settings.replica_batch_size is not None
            else f"the global batch of {settings.global_batch_size} over the layouts of {settings.num_devices} devices"
        )
        return PlanError(
            f"No micro-batch count splits {batch} (micro-batches of at least {settings.min_micro_batch_size}, "
            f"at most {settings.max_micro_batches}): change the batch size or the device count."
        )
    limit = settings.usable_memory / (1 - settings.memory_margin)
    problem = f"The model does not fit on {settings.num_devices} device(s) of {_gib(limit)}{_forced(settings)}"
    return PlanError.does_not_fit(problem, _remedies(blocks, ranges, settings, reference))


def _forced(settings: SearchSettings) -> str:
    """The choices the user fixed, as they would read them in their options."""
    fixed = {
        "pipeline_stages": settings.pipeline_stages,
        "replicas": settings.replicas,
        "micro_batches": settings.micro_batches,
        "activation_checkpointing": settings.activation_checkpointing,
        "zero_stage": settings.zero_stage,
        "offload_optimizer": settings.offload_optimizer,
        "zero_bubble": settings.zero_bubble or None,
    }
    named = [f"{name}={value}" for name, value in fixed.items() if value is not None]
    return f" with {', '.join(named)}" if named else ""


def _remedies(blocks: Sequence[BlockCost], ranges: _RangeTables, settings: SearchSettings, reference: int) -> list[str]:
    """Each change that makes some plan fit, with its numbers (each one checked by a search)."""
    remedies = []
    devices = _devices_needed(blocks, ranges, settings, reference)
    if devices is not None:
        remedies.append(f"at least {devices} devices")
    needed = _memory_needed(blocks, ranges, settings, reference)
    if math.isfinite(needed):
        remedies.append(f"devices with at least {_gib(needed)} each (with a {settings.memory_margin:.0%} margin)")
    largest = settings.replica_batch_size or settings.global_batch_size
    relaxations: dict[str, dict[str, object]] = {
        "micro_batches": dict(micro_batches=None, max_micro_batches=largest),
        "activation_checkpointing": dict(activation_checkpointing=None),
        "zero_stage": dict(zero_stage=None),
        "offload_optimizer": dict(offload_optimizer=None),
        "pipeline_stages": dict(pipeline_stages=None),
        "replicas": dict(replicas=None),
    }
    for name, changes in relaxations.items():
        if getattr(settings, name) in (None, True):
            continue  # not forced (or checkpointing already on): nothing to relax
        relaxed = _replace(settings, **changes)
        found = _best_plan(blocks, ranges, relaxed, reference, [])
        found = found or _with_zero3(blocks, ranges, relaxed, reference, [], None)
        if found is not None:
            remedies.append(f"{name}={_auto(name)!r} (it finds {plan_shape(found[0])})")
    return remedies


def _auto(name: str) -> str | None:
    return {"activation_checkpointing": "auto", "replicas": None}.get(name, "auto")


def plan_shape(plan: PartitionPlan) -> str:
    """The layout in words, for an error's remedy: "2 stage(s) x 4 replica(s), 8 micro-batches"."""
    checkpointed = sum(s.checkpoint or s.recompute_end is not None for s in plan.stages)
    shape = f"{plan.pipeline_stages} stage(s) x {plan.num_replicas} replica(s), {plan.num_microbatches} micro-batches"
    shape += f", {checkpointed} stage(s) checkpointed" if checkpointed else ""
    return shape + (", optimizer offloaded" if plan.offload_optimizer else "")


def _gib(num_bytes: float) -> str:
    """GiB with enough digits to tell small sizes apart (a test model's 0.0016 GiB)."""
    return f"{num_bytes / 2**30:.{max(1, 2 - math.floor(math.log10(max(num_bytes, 1) / 2**30)))}f} GiB"


def _memory_needed(
    blocks: Sequence[BlockCost], ranges: _RangeTables, settings: SearchSettings, reference: int
) -> float:
    """Smallest per-device memory (limit before the margin) with which some layout fits."""
    settings = _widened(settings) or settings
    best = math.inf
    for stages, replicas in _layouts(settings, len(blocks)):
        for microbatches in _microbatch_counts(settings, replicas):
            layout = _make_layout(blocks, ranges, settings, (stages, replicas, microbatches, 1), reference)
            found = min_max_partition(len(blocks), stages, layout.least_memory)
            if found:
                best = min(best, found[1])
    return best / (1 - settings.memory_margin)


def _devices_needed(
    blocks: Sequence[BlockCost], ranges: _RangeTables, settings: SearchSettings, reference: int
) -> int | None:
    """The fewest devices (the count times a power of two, up to 1024x) with which a plan fits;
    with the stage count forced, more devices are more replicas (which share optimizer state)."""
    settings = _widened(settings) or settings
    for scale in (2**k for k in range(1, 11)):
        larger = _replace(settings, num_devices=settings.num_devices * scale, replicas=None)
        for stages, replicas in _layouts(larger, len(blocks)):
            for microbatches in _microbatch_counts(larger, replicas):
                shape = (stages, replicas, microbatches, 1)
                if _plan_layout(_make_layout(blocks, ranges, larger, shape, reference)):
                    return larger.num_devices
    return None


def _replace(settings: SearchSettings, **changes: object) -> SearchSettings:
    return dataclasses.replace(settings, **changes)  # type: ignore[arg-type]
