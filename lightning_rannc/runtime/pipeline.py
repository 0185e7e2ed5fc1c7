"""Run this rank's stages of a plan with ``torch.distributed.pipelining``.

One ``PipelineRuntime`` per rank and batch shape: it builds the rank's stage modules from the
captured graph, wraps them in ``PipelineStage`` objects and the plan's schedule, runs a whole
step (every micro-batch forward and backward), and hands the step's outputs (loss, logged
values, averaged over replicas) to every rank.

Lightning zeroes gradients between ``training_step`` and ``backward`` (see
``_AutomaticOptimization``), but the schedule runs backward inside ``training_step``. So the
step's gradients are held aside (``pending``), averaged over replicas and summed over stages
sharing a parameter, and added to ``.grad`` when Lightning calls ``backward``; gradient
accumulation and zero-grad hooks keep their meaning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import fx
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.schedules import PipelineScheduleMulti
from torch.nn.parallel import DistributedDataParallel

from lightning_rannc import _rng
from lightning_rannc._compat import (
    SCHEDULE_STEP_TAKES_RETURN_OUTPUTS,
    TORCH_GREATER_EQUAL_2_13,
    PipelineStageClass,
    ddp_without_buffer_sync,
    forward_only_schedule,
)
from lightning_rannc.capture.graph import StepGraph
from lightning_rannc.capture.reductions import MEAN, Reduction, combine_scalars
from lightning_rannc.capture.split import build_range_module
from lightning_rannc.errors import RuntimeSetupError
from lightning_rannc.plan.plan import V_SHAPED, PartitionPlan, StagePlan
from lightning_rannc.runtime.mesh import ProcessGroups
from lightning_rannc.runtime.trace import EventTrace
from lightning_rannc.runtime.zero3 import GatheredParams, gather_in_graph

__all__ = ["PipelineRuntime", "SeededStage", "microbatch_indices"]


Grads = dict[torch.nn.Parameter, torch.Tensor | None]


class SeededStage(torch.nn.Module):
    """Runs a stage module inside the random stream of the current micro-batch, optionally
    recomputing its activations in backward (activation checkpointing): all of them, or with
    ``recomputed`` (selective checkpointing) those of these modules, the stage's first layers
    one each, run in order under a checkpoint each; the last one's outputs are ``module``'s
    inputs.

    The stage's random ops seed themselves from (seed, step, replica, micro-batch, node): see
    ``lightning_rannc/_rng.py``. A stage runs its forwards in micro-batch order under every
    schedule, so counting them gives the micro-batch. The recomputation runs in the same stream,
    so it draws the same dropout masks as the forward.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        replica: int,
        device: torch.device,
        checkpoint: bool = False,
        recomputed: Sequence[torch.nn.Module] = (),
        gathered: GatheredParams | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.gathered = gathered
        self.recomputed = torch.nn.ModuleList(recomputed)
        self.replica = replica
        self.device = device
        self.checkpoint = checkpoint
        self.seed = 0
        self.step = 0
        self.microbatch = 0

    def start_step(self, seed: int, step: int) -> None:
        self.seed, self.step, self.microbatch = seed, step, 0

    def forward(self, *args: Any) -> Any:
        if self.gathered is None:
            return self._forward(*args)
        try:
            with self.gathered.saving():
                return self._forward(*args)
        finally:
            self.gathered.forward_done()

    def _forward(self, *args: Any) -> Any:
        key = (self.seed, self.step, self.replica, self.microbatch)
        self.microbatch += 1
        if self.checkpoint:
            return torch.utils.checkpoint.checkpoint(self._run, key, *args, use_reentrant=False)
        for region in self.recomputed:
            args = torch.utils.checkpoint.checkpoint(self._run, key, *args, module=region, use_reentrant=False)
        return self._run(key, *args)

    def _run(self, key: tuple[int, ...], *args: Any, module: torch.nn.Module | None = None) -> Any:
        # Each region seeds its random ops from the node's index (``_rng.reseed``): recomputing
        # one region draws the same masks as its forward, in whichever order regions recompute.
        with _rng.stream(key, self.device):
            return (module or self.module)(*args)


class PipelineRuntime:
    """This rank's stages of ``plan`` for one batch shape, ready to run steps."""

    def __init__(
        self,
        graph: StepGraph,
        plan: PartitionPlan,
        rank: int,
        device: torch.device,
        groups: ProcessGroups,
        trace: EventTrace | None = None,
        forward_only: bool = False,
        num_scalar_outputs: int | None = None,
        reductions: Mapping[int, Reduction] | None = None,
        owners: Mapping[str, int] | None = None,
        holders: Mapping[str, int] | None = None,
    ) -> None:
        """``owners``: trainable tensor -> the replica whose optimizer updates it (with ZeRO-2,
        where its gradient is reduced to). ``holders``: ZeRO-3's parameters -> the replica
        holding each (``runtime/zero3.py``); the others gather them where they are used."""
        self.plan = plan
        self._trace = trace
        self.device = device
        self.groups = groups
        self.num_outputs = len(graph.outputs)
        # Training: the loss and logged values are scalars, shared by every rank; the outputs
        # after them (torchmetrics arguments) are tensors, shared within the pipeline.
        self.num_scalar_outputs = self.num_outputs if num_scalar_outputs is None else num_scalar_outputs
        self.tensor_outputs: list[torch.Tensor] = []
        # How each scalar output combines over micro-batches (a mean unless captured otherwise).
        self.reductions = dict(reductions or {})
        self._loss_divisor = plan.num_microbatches if self.reductions.get(0, MEAN) == MEAN else 1
        self._output_examples = [value.meta["val"] for value in graph.outputs]
        no_grad = set(plan.no_grad_values)
        fresh = plan.zero_bubble and not forward_only
        # With selective checkpointing a stage is several modules: its first layers, one each
        # (recomputed in backward), and the rest; each takes the values crossing the cut before it.
        own_stages = plan.stages_of_rank(rank)
        kept_from = [s.node_start if s.recompute_end is None else s.recompute_end for s in own_stages]
        self.modules = [
            build_range_module(graph, start, s.node_end, detach=no_grad, fresh_outputs=fresh)
            for start, s in zip(kept_from, own_stages)
        ]
        recomputed = [_recomputed_regions(graph, s, no_grad) for s in own_stages]
        self._seeded = [
            SeededStage(module, groups.dp_rank, device, checkpoint=s.checkpoint, recomputed=regions)
            for module, regions, s in zip(self.modules, recomputed, own_stages)
        ]
        self.modules += [region for regions in recomputed for region in regions]
        self._gathered = GatheredParams(holders, groups, device) if holders else None
        if self._gathered is not None:
            gathering = [gather_in_graph(module, self._gathered) for module in self.modules]
            for seeded in self._seeded:
                seeded.gathered = self._gathered if any(gathering) else None
        # Replicas average gradients through DDP, which torch's stages drive: no_sync for every
        # micro-batch but the last, whose backward then all-reduces finished buckets while it
        # runs. Zero bubble splits that backward in two, and ZeRO-2 reduces each gradient to one
        # replica only: there the exchange follows the schedule.
        self._ddp = groups.num_replicas > 1 and dist.is_initialized() and not forward_only
        self._ddp = self._ddp and not plan.zero_bubble and plan.zero_stage not in (2, 3)
        submodules = [
            _replicated(seeded, groups, device) if self._ddp and _trains(seeded) else seeded for seeded in self._seeded
        ]
        self.stages = [
            _build_stage(graph, submodule, stage_plan, plan.num_stages, device, groups.pp_group, no_grad, forward_only)
            for submodule, stage_plan in zip(submodules, plan.stages_of_rank(rank))
        ]
        _check_stages_of_one_rank(plan, len(self.stages))
        self.schedule = _build_schedule(plan, self.stages, self._loss_fn, forward_only)
        if trace is not None:
            for stage in self.stages:
                trace.watch_stage(stage)
            trace.watch_schedule(self.schedule)
        self._outputs: list[list[torch.Tensor]] = []
        self._pending: Grads = {}
        self._loss_scale: float | torch.Tensor = 1.0
        # Not ZeRO-3's meta stand-ins for parameters other replicas hold: they get no gradient.
        trained = (p for m in self.modules for p in m.parameters() if p.requires_grad and not p.is_meta)
        self._params = list({id(p): p for p in trained}.values())
        by_name = {n: p for m in self.modules for n, p in m.named_parameters() if p.requires_grad}
        # In the group's order (the same on every rank), not this rank's parameter order: the
        # flat buffers of the ranks are summed element by element.
        self._tied = [(group, [by_name[n] for n in tied if n in by_name]) for group, tied in groups.tied]
        # ZeRO-2: each replica's share of the gradients, by name (the same order on every replica).
        # ZeRO-3's gathered parameters have theirs reduced during backward.
        sharded = plan.zero_stage in (2, 3) and groups.num_replicas > 1 and dist.is_initialized()
        self._shares: list[list[torch.nn.Parameter]] = []
        if sharded and owners is not None:
            reduced = [n for n in sorted(owners) if n in by_name and n not in (holders or {})]
            self._shares = [[by_name[n] for n in reduced if owners[n] == r] for r in range(groups.num_replicas)]

    @property
    def is_first(self) -> bool:
        return any(stage.is_first for stage in self.stages)

    @property
    def is_last(self) -> bool:
        return any(stage.is_last for stage in self.stages)

    def _loss_fn(self, output: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        # `target` is the micro-batch index (see `run`): keep outputs in micro-batch order.
        self._outputs[int(target.reshape(-1)[0])] = [o.detach() for o in output]
        # A mean loss is the mean over micro-batches (a sum loss their sum): dividing each
        # micro-batch's loss before backward (not its gradients after, scale_grads=False) keeps
        # every activation gradient what one device computes, so fp16 overflows where one device
        # would, not M times sooner.
        return output[0] * (self._loss_scale / self._loss_divisor)

    def run(
        self,
        leaves: Sequence[torch.Tensor],
        seed: int,
        step: int,
        loss_scale: float | torch.Tensor = 1.0,
        keep_grads: bool = True,
    ) -> torch.Tensor:
        """Run one step; return the mean over micro-batches and replicas of every graph output.

        ``loss_scale`` multiplies the loss before backward (16-bit loss scaling): the gradients
        come out scaled, as Lightning's scaler expects after its own ``scale(loss).backward()``.
        A tensor on the device (the scaler's own) costs no wait for the device. ``keep_grads``:
        the parameters' gradients belong to earlier batches of an accumulation window; if not,
        they are the last step's, which Lightning zeroes after this step: freed now, not kept
        beside the new ones through the schedule.
        """
        # Gradients of earlier batches of an accumulation window: DDP's last backward rewrites its
        # buckets, and with bucket views a gradient still viewing one must be copied out first.
        taken = self._take_grads()
        held = {p: g.clone() if g is not None and self._ddp else g for p, g in taken.items()} if keep_grads else {}
        del taken
        args, kwargs = self._start(leaves, seed, step, loss_scale)
        self.schedule.step(*args, **kwargs)
        if self._gathered is not None:
            self._gathered.step_done()
        pending = self._take_grads()
        for param, grad in held.items():
            param.grad = grad
        if self._shares:
            # ZeRO-2: copies of a tied weight summed first (each stage's copy may have another owner).
            with self._span("tied-weight gradient sum"):
                self._sum_tied(pending)
            with self._span("gradients reduced to their owners"):
                self._reduce_to_owners(pending)
        else:
            if not self._ddp:
                with self._span("gradient average over replicas"):
                    self._average_over_replicas(pending)
            with self._span("tied-weight gradient sum"):
                self._sum_tied(pending)
        self._pending = pending
        with self._span("loss and logged values shared"):
            values = self._share_outputs()
        if self.num_scalar_outputs < self.num_outputs:
            with self._span("metric arguments shared"):
                self.tensor_outputs = self._broadcast_outputs(first=self.num_scalar_outputs)
        return values

    def evaluate(self, leaves: Sequence[torch.Tensor], seed: int, step: int) -> list[torch.Tensor]:
        """Run every micro-batch forward only (no gradients kept); return each graph output,
        combined over the micro-batches (scalars averaged, per-sample tensors concatenated),
        on every rank of this pipeline."""
        args, kwargs = self._start(leaves, seed, step, loss_scale=1.0)
        # Lightning evaluates under inference mode; the stages' receive buffers are ordinary
        # tensors that the schedule writes in place, which inference mode would refuse later.
        with torch.inference_mode(False), torch.no_grad():
            self.schedule.eval(*args, **kwargs)
        if self._gathered is not None:
            self._gathered.step_done()  # nothing prefetched outlives the schedule
        with self._span("evaluation outputs shared"):
            return self._broadcast_outputs()

    def _start(
        self, leaves: Sequence[torch.Tensor], seed: int, step: int, loss_scale: float | torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
        """Prepare a step; return the schedule's arguments. The target of each micro-batch is its
        index (see ``_loss_fn``)."""
        self._loss_scale = loss_scale
        for seeded in self._seeded:
            seeded.start_step(seed, step)
        self._outputs = [[] for _ in range(self.plan.num_microbatches)]
        kwargs: dict[str, Any] = {"return_outputs": False} if SCHEDULE_STEP_TAKES_RETURN_OUTPUTS else {}
        kwargs["target"] = microbatch_indices(self.plan.num_microbatches)
        return (tuple(leaves) if self.is_first else ()), kwargs

    def _broadcast_outputs(self, first: int = 0) -> list[torch.Tensor]:
        """Graph outputs ``first`` and after, combined over micro-batches, from the last stage
        to every rank of this pipeline."""
        num_microbatches = self.plan.num_microbatches
        if self.is_last:
            combined = [self._combine([outs[i] for outs in self._outputs], i) for i in range(first, self.num_outputs)]
        else:  # the shapes are known from the capture: allocate and receive
            examples = self._output_examples[first:]
            combined = [_combined_like(example, num_microbatches, self.device) for example in examples]
        if dist.is_initialized() and self.plan.pipeline_stages > 1:
            last = self.plan.stages[-1].ranks[self.groups.dp_rank]
            for value in combined:
                dist.broadcast(value, src=last, group=self.groups.pp_group)
        return combined

    def _combine(self, per_microbatch: list[torch.Tensor], index: int) -> torch.Tensor:
        return _combined(per_microbatch, self.reductions.get(index, MEAN))

    def _span(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self._trace.span(name, "collective") if self._trace is not None else contextlib.nullcontext()

    def pending_grads(self) -> Grads:
        """The last step's gradients (averaged over replicas, tied copies summed), before
        ``accumulate_grads`` hands them to the parameters."""
        return self._pending

    def _take_grads(self) -> Grads:
        grads = {p: p.grad for p in self._params}
        for param in self._params:
            param.grad = None
        return grads

    def _share_outputs(self) -> torch.Tensor:
        """The scalar outputs on every rank, combined over micro-batches. Means are averaged over
        replicas too (every rank logs the same loss); sums, maxima and minima stay each replica's
        own, as with DDP, and ``self.log(..., sync_dist=True)`` reduces them over replicas."""
        count, replicas = self.num_scalar_outputs, self.groups.num_replicas
        own = [i for i in range(count) if self.reductions.get(i, MEAN) != MEAN]
        # One all-reduce: the means, then a row per replica for the replicas' own values.
        shared = torch.zeros(count + replicas * len(own), dtype=torch.float64, device=self.device)
        if self.is_last:
            per_output = [[outs[i] for outs in self._outputs] for i in range(count)]
            values = torch.stack([combine_scalars(v, self.reductions.get(i, MEAN)) for i, v in enumerate(per_output)])
            shared[:count] = values
            row = count + self.groups.dp_rank * len(own)
            shared[row : row + len(own)] = values[own]
        if dist.is_initialized():
            # Only the last stage of each replica contributes: the sum over ranks / D is the mean.
            dist.all_reduce(shared)
        values = shared[:count] / replicas
        row = count + self.groups.dp_rank * len(own)
        values[own] = shared[row : row + len(own)]
        return values

    def _average_over_replicas(self, pending: Grads) -> None:
        """After the schedule, when DDP did not average during it (zero bubble)."""
        if self.groups.num_replicas == 1:
            return
        params = [p for p, g in pending.items() if g is not None]  # the same set on every replica
        _reduce_flat(pending, params, self.groups.dp_group, scale=1.0 / self.groups.num_replicas)

    def _reduce_to_owners(self, pending: Grads) -> None:
        """ZeRO-2: each replica's share of the gradients averaged onto it (one flat reduce per
        share); the others' shares are freed here, so only ``1 / D`` of the gradients stays."""
        scale = 1.0 / self.groups.num_replicas
        for replica, share in enumerate(self._shares):
            params = [p for p in share if pending.get(p) is not None]  # the same on every replica
            if not params:
                continue
            flat = _flat_grads(pending, params)
            dst = self.groups.replica_rank(replica)
            dist.reduce(flat, dst=dst, group=self.groups.dp_group)
            mine = replica == self.groups.dp_rank
            chunks = flat.mul_(scale).split([p.numel() for p in params]) if mine else [None] * len(params)
            for param, chunk in zip(params, chunks):
                pending[param] = chunk.view_as(param) if chunk is not None else None
            del flat

    def _sum_tied(self, pending: Grads) -> None:
        """Sum the gradients of parameters held by several stages, so their copies stay equal."""
        for group, params in self._tied:
            _reduce_flat(pending, params, group, scale=1.0)

    def accumulate_grads(self, scale: float) -> None:
        """Add the last step's gradients, times ``scale``, to ``.grad`` (Lightning's backward)."""
        pending, self._pending = self._pending, {}
        for param, grad in pending.items():
            if grad is None:
                continue
            grad = grad * scale if scale != 1.0 else grad
            param.grad = grad if param.grad is None else param.grad + grad


def _check_stages_of_one_rank(plan: PartitionPlan, num_local_stages: int) -> None:
    """torch < 2.13 sends values between two stages of one rank through the process group, to
    itself, which gloo refuses with an error that names neither; only a single-rank pipeline
    with virtual stages has such neighbours."""
    gloo = dist.is_initialized() and dist.get_backend() == "gloo"
    if plan.pipeline_stages == 1 and num_local_stages > 1 and gloo and not TORCH_GREATER_EQUAL_2_13:
        raise RuntimeSetupError(
            f"pipeline_stages=1 with virtual_stages={num_local_stages} needs torch 2.13 or later on the gloo backend "
            f"(torch {torch.__version__} exchanges between stages of one rank through gloo, which refuses it). "
            "Use pipeline_stages > 1, or a newer torch."
        )


def microbatch_indices(num_microbatches: int) -> torch.Tensor:
    """The schedule's ``target``: each micro-batch's index, which ``_loss_fn`` reads back. On the
    CPU, whatever the stages' device: reading a CUDA tensor there would wait for the GPU at every
    micro-batch (torch's schedule hands targets to the loss function as they are)."""
    return torch.arange(num_microbatches, device="cpu")


def _combined(per_microbatch: list[torch.Tensor], reduction: Reduction) -> torch.Tensor:
    """One graph output over the micro-batches: scalars (losses, logged values) reduced as
    captured (averaged, summed, ...), per-sample tensors (predictions) concatenated along the
    batch dimension."""
    if per_microbatch[0].dim() == 0:
        return combine_scalars(per_microbatch, reduction).to(_scalar_dtype(per_microbatch[0].dtype))
    return torch.cat(per_microbatch).contiguous()


def _combined_like(example: torch.Tensor, num_microbatches: int, device: torch.device) -> torch.Tensor:
    if example.dim() == 0:
        return torch.empty((), dtype=_scalar_dtype(example.dtype), device=device)
    shape = (example.shape[0] * num_microbatches, *example.shape[1:])
    return torch.empty(shape, dtype=example.dtype, device=device)


def _scalar_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _trains(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _replicated(module: torch.nn.Module, groups: ProcessGroups, device: torch.device) -> DistributedDataParallel:
    """``module`` in DDP over its replicas. No collective at construction (runtimes are built per
    batch shape, when replicas may be at other batches) and none in forward: replicas already
    hold equal parameters, and the strategy shares written buffers itself. The gradients are
    views into DDP's buckets, which saves a copy of every gradient of the stage; each step's are
    taken out before the next backward rewrites the buckets (``run``)."""
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(
        module,
        device_ids=device_ids,
        process_group=groups.dp_group,
        init_sync=False,
        gradient_as_bucket_view=True,
        **ddp_without_buffer_sync(),
    )


def _reduce_flat(pending: Grads, params: list[torch.nn.Parameter], group: Any, scale: float) -> None:
    """All-reduce (sum) the pending gradients of ``params`` as one flat buffer, times ``scale``."""
    if not params:
        return
    flat = _flat_grads(pending, params)
    dist.all_reduce(flat, group=group)
    if scale != 1.0:
        flat.mul_(scale)
    for param, chunk in zip(params, flat.split([p.numel() for p in params])):
        pending[param] = chunk.view_as(param)


def _flat_grads(pending: Grads, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The pending gradients of ``params`` in one flat buffer (zeros where one has none)."""
    grads = [pending.get(p) for p in params]
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def _build_stage(
    graph: StepGraph,
    module: torch.nn.Module,
    stage: StagePlan,
    num_stages: int,
    device: torch.device,
    group: Any,
    no_grad: set[str],
    forward_only: bool = False,
) -> PipelineStage:
    # Static metadata: without it the pipeline infers shapes by running the stage on
    # uninitialised tensors, which breaks ops that check their integer inputs (labels).
    return PipelineStageClass(
        module,
        stage.stage_index,
        num_stages,
        device,
        input_args=_examples(
            graph.stage_inputs(stage.node_start), no_grad, device, stage.node_start == 0 or forward_only
        ),
        output_args=_examples(graph.stage_outputs(stage.node_end), no_grad, device, forward_only),
        group=group,
    )


def _recomputed_regions(graph: StepGraph, stage: StagePlan, no_grad: set[str]) -> list[fx.GraphModule]:
    """The modules of a stage's selectively checkpointed layers, in order (none without)."""
    if stage.recompute_end is None:
        return []
    bounds = [stage.node_start, *stage.recompute_cuts, stage.recompute_end]
    return [build_range_module(graph, a, b, detach=no_grad) for a, b in zip(bounds, bounds[1:])]


_SCHEDULES: dict[str, type[Any]] = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zero_bubble": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
    # Without backward every schedule is a fill and drain of forwards: GPipe's, or with several
    # stages per rank the looped breadth-first one, which (unlike interleaved 1F1B) takes any
    # micro-batch count.
    "forward_only": ScheduleGPipe,
    "forward_only_looped": ScheduleLoopedBFS,
}
"""torch's schedule class for each way a plan runs (see ``_schedule_name``)."""


def _build_schedule(plan: PartitionPlan, stages: list[PipelineStage], loss_fn: Any, forward_only: bool = False) -> Any:
    """torch's schedule for this rank's ``stages`` of ``plan``.

    Args:
        plan: the plan; its ``schedule``, ``zero_bubble`` and ``num_microbatches`` choose the class.
        stages: this rank's stages (several with interleaving).
        loss_fn: called on the last stage's outputs of each micro-batch.
        forward_only: evaluation: forwards only.

    Returns:
        A schedule whose ``step`` runs one batch. Micro-batch losses are not rescaled by torch
        (``scale_grads=False``): ``loss_fn`` divides each loss itself.
    """
    name = _schedule_name(plan, len(stages), forward_only)
    if name == "forward_only_placed":
        positions = {s.stage_index: plan.position_of(s.stage_index) for s in plan.stages}
        return forward_only_schedule(stages, plan.num_microbatches, positions, loss_fn=loss_fn, scale_grads=False)
    schedule_class = _SCHEDULES[name]
    # Multi-stage schedules take the list of this rank's stages; the others its one stage.
    stage_or_stages = list[Any](stages) if issubclass(schedule_class, PipelineScheduleMulti) else stages[0]
    return schedule_class(stage_or_stages, n_microbatches=plan.num_microbatches, loss_fn=loss_fn, scale_grads=False)


def _schedule_name(plan: PartitionPlan, num_local_stages: int, forward_only: bool) -> str:
    if forward_only:
        if num_local_stages == 1:
            return "forward_only"
        return "forward_only_placed" if plan.schedule in V_SHAPED else "forward_only_looped"
    if plan.schedule in V_SHAPED:
        return plan.schedule
    return "zero_bubble" if plan.zero_bubble else plan.schedule


def _examples(
    values: Sequence[fx.Node], no_grad: set[str], device: torch.device, without_grad: bool
) -> tuple[torch.Tensor, ...]:
    """Tensors with the shape, dtype and requires_grad each value has at run time (contiguous:
    stage outputs are made contiguous before they are sent). ``without_grad``: the batch's
    leaves, or a forward-only pipeline."""
    examples = []
    for value in values:
        fake = value.meta["val"]
        tensor = torch.empty(fake.shape, dtype=fake.dtype, device=device)
        if not without_grad and fake.is_floating_point() and value.name not in no_grad:
            tensor.requires_grad_(True)
        examples.append(tensor)
    return tuple(examples)
