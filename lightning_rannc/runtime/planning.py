"""Rank 0's planning work: cost the step's blocks, search, and check the plan.

Two callers share it. The strategy chooses the layout (stages x replicas) at ``setup``, before
Lightning shards the data loaders over the replicas, from a sample batch (``choose_layout``);
the engine then makes the plan at the first batch with that layout fixed (``deployed_or_new_plan``).
Both get the block costs through one ``ProfileCache``, so the model is profiled once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_rannc._utils import where_defined
from lightning_rannc.capture.batch import FlatBatch
from lightning_rannc.capture.graph import StepGraph, group_nodes
from lightning_rannc.config import RaNNCConfig
from lightning_rannc.dry_run import precision_remedies
from lightning_rannc.errors import PlanError, RuntimeSetupError
from lightning_rannc.plan.cost_model import BlockCost, with_fixed_parts, with_larger_timing
from lightning_rannc.plan.devices import DeviceSpec, get_device
from lightning_rannc.plan.plan import PartitionPlan, choose_microbatches
from lightning_rannc.plan.report import microbatch_choice
from lightning_rannc.plan.search import SearchResult, SearchSettings, search_plan
from lightning_rannc.profile.analytic import estimate_blocks
from lightning_rannc.profile.cache import ProfileCache, profile_key
from lightning_rannc.profile.profiler import find_no_grad_values, profile_blocks
from lightning_rannc.profile.tensors import tensor_table
from lightning_rannc.runtime.captures import ResizedSample, captured_for_costs, timing_samples

__all__ = [
    "EngineOptions",
    "Layout",
    "choose_layout",
    "reference_microbatches",
    "block_costs",
    "search_settings",
    "deployed_or_new_plan",
]

log = logging.getLogger("lightning_rannc")

UNLIMITED = 2**62
"""Bytes: "no memory limit" for the search."""
_REFERENCE_MICROBATCHES = 4
"""When the search picks the micro-batch count, costs are measured for micro-batches of a
quarter of the batch (where the batch allows) and interpolated to the other sizes from timings
at the smallest and the largest size the search may pick (``captures.timing_samples``)."""


@dataclass(kw_only=True, frozen=True)
class EngineOptions:
    """The strategy's options (``config``) and what ``setup`` resolved from them."""

    config: RaNNCConfig = dataclasses.field(default_factory=RaNNCConfig)
    pipeline_stages: int
    """Ranks per pipeline (S)."""
    num_replicas: int = 1
    """Data-parallel copies of the pipeline (D)."""
    device: DeviceSpec | None = None
    """The device description to plan with (measured links); ``None``: ``config.device_preset``'s
    (``"cpu"`` when that is ``None`` too)."""
    devices_per_node: int = 8
    """Ranks per node: links between them are intra-node."""
    optimizer: str = "adamw"
    """Optimizer state kind for the memory model (``memory.OPTIMIZER_STATE``)."""
    memory_limit: int | None = None
    """Bytes per device (``config.memory_limit`` read, or the CUDA device's); ``None``: unlimited."""
    accumulating: bool = False
    """The Trainer accumulates gradients over several batches (``accumulate_grad_batches`` > 1)."""
    loss_scaling: bool = False
    """The Trainer scales the loss (``16-mixed``): its scaler unscales the optimizer's gradients
    before the step, which an offloaded optimizer has not received yet."""
    precision: str = "32-true"
    """The Trainer's precision: where nothing fits, the lower ones are tried for the refusal's remedies."""
    epoch_samples: int | None = None
    """``SearchSettings.epoch_samples`` of the training data (``None``: not known)."""

    @property
    def device_spec(self) -> DeviceSpec:
        return self.device if self.device is not None else get_device(self.config.device_preset or "cpu")

    @property
    def num_microbatches(self) -> int | None:
        """The micro-batch count asked for; ``None``: the search picks it."""
        requested = self.config.micro_batches
        return None if requested == "auto" else int(requested)

    @property
    def zero_stage(self) -> int | None:
        """The optimizer-state layout asked for, or ``None``: the search's choice."""
        wanted = self.config.zero_stage
        return None if wanted == "auto" else int(wanted)

    @property
    def offload_optimizer(self) -> bool | None:
        """Optimizer offload asked for (``None``: where nothing fits otherwise); never with loss scaling."""
        wanted = self.config.offload_optimizer
        if self.loss_scaling and wanted is True:
            raise RuntimeSetupError(
                "RaNNCStrategy(offload_optimizer=True) does not run with precision='16-mixed' yet (the loss scaler "
                "unscales the optimizer's gradients before they reach the host): use 'bf16-mixed', or "
                "offload_optimizer='auto' or False."
            )
        return False if self.loss_scaling else None if wanted == "auto" else bool(wanted)

    @property
    def checkpointing(self) -> bool | None:
        """Activation checkpointing for every stage, none, or (``None``) where memory needs it."""
        wanted = self.config.activation_checkpointing
        return None if wanted == "auto" else bool(wanted)

    @property
    def search_virtual_stages(self) -> int | None:
        """Stages per rank asked for; ``None``: the search's choice."""
        wanted = self.config.virtual_stages
        if wanted == "auto":
            return None
        return max(2, int(wanted)) if self.config.schedule == "interleaved_1f1b" else int(wanted)

    @property
    def search_zero_bubble(self) -> bool | None:
        """Zero bubble asked for (or refused); ``None``: the search's choice."""
        wanted = self.config.zero_bubble
        return None if wanted == "auto" else bool(wanted)

    @property
    def min_microbatches(self) -> int:
        """Fewest micro-batches the schedule can run: 1F1B-like schedules fill every stage."""
        config = self.config
        forced = (self.search_virtual_stages or 1) > 1 or self.search_zero_bubble
        needs_fill = config.schedule in ("1f1b", "interleaved_1f1b", "zbv") or forced
        return self.pipeline_stages if needs_fill else 1


@dataclass(frozen=True)
class Layout:
    """Stages per pipeline and replicas."""

    pipeline_stages: int
    num_replicas: int
    summary: str
    plan: PartitionPlan | None = None
    """The plan the search predicted for the layout (``None`` from a deployment)."""


def reference_microbatches(batch_size: int, requested: int | None, minimum: int) -> int:
    """Micro-batches the step is captured and costed for: the requested count (or the nearest
    that divides the batch), or when the search picks it, a reference count."""
    return choose_microbatches(batch_size, requested or _REFERENCE_MICROBATCHES, minimum)


def block_costs(
    graph: StepGraph,
    micro_leaves: list[torch.Tensor],
    options: EngineOptions,
    cache: ProfileCache,
    analytic: bool,
    samples: Sequence[ResizedSample] = (),
) -> list[BlockCost]:
    """Costs of the graph's blocks for one micro-batch: analytic for the device preset when the
    tensors are fake (nothing can run), else measured on this device, and on each of
    ``samples`` too: on a smaller micro-batch for the part of each time that does not shrink
    with it (the analytic costs have that part already), on a larger one for how time grows
    beyond it; through ``cache``."""
    spans = group_nodes(graph, options.config.max_blocks)
    device = options.device_spec
    samples = () if analytic else samples
    # "one call less": measured backwards without a call each (older caches kept them)
    method = f"analytic:{device.name}" if analytic else "measured, one call less"
    for sample in samples:
        method += f", and at {sample.size} samples"
    hardware = _hardware(micro_leaves[0].device)
    key = profile_key(graph.fingerprint(), micro_leaves, spans, hardware, method, graph.tensors)
    costs = cache.load(key)
    if costs is not None:
        log.debug("block costs of graph %s from the profile cache", graph.fingerprint())
        return costs
    started = time.perf_counter()
    if analytic:
        costs = estimate_blocks(graph, micro_leaves, spans, device=device)
    else:
        costs = profile_blocks(graph, micro_leaves, spans, options.config.profile_repeats)
        for sample in samples:
            costs = _timed_again(costs, spans, int(micro_leaves[0].shape[0]), sample, options)
    cache.store(key, costs)
    how = f"estimated for {device.name}" if analytic else "profiled"
    log.info("%s %d blocks of %d nodes in %.1f s", how, len(spans), len(graph), time.perf_counter() - started)
    return costs


def _timed_again(
    costs: list[BlockCost], spans: list[tuple[int, int]], size: int, sample: ResizedSample, options: EngineOptions
) -> list[BlockCost]:
    """``costs`` (micro-batches of ``size``) with the blocks timed again on ``sample``: fixed
    parts from a smaller micro-batch, a larger timing from a larger one. The second timing only
    refines the costs: when the step cannot be captured or run on that micro-batch (a larger one
    may not fit in memory), or splits into other blocks, they stay as they were."""
    try:
        graph, leaves = sample.capture()
        if group_nodes(graph, options.config.max_blocks) != spans:
            raise ValueError("the step splits into other blocks")
        timed = profile_blocks(graph, leaves, spans, options.config.profile_repeats)
    except Exception as error:
        log.warning(
            "could not time the step on micro-batches of %d samples (%s): micro-batches of that size are "
            "costed from the timing at %d samples",
            sample.size,
            error,
            size,
        )
        return costs
    if sample.size < size:
        return with_fixed_parts(costs, timed, size, sample.size)
    return with_larger_timing(costs, timed, size, sample.size)


def _hardware(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def search_settings(
    options: EngineOptions, *, num_devices: int, replica_batch_size: int, layout: Layout | None
) -> SearchSettings:
    """The search's settings from the strategy's options; ``layout`` fixes stages and replicas."""
    config = options.config
    return SearchSettings(
        num_devices=num_devices,
        global_batch_size=replica_batch_size * num_devices,
        replica_batch_size=replica_batch_size,
        device=options.device_spec,
        devices_per_node=options.devices_per_node,
        memory_limit=options.memory_limit if options.memory_limit is not None else UNLIMITED,
        memory_margin=config.memory_margin,
        optimizer=options.optimizer,
        pipeline_stages=layout.pipeline_stages if layout else None,
        replicas=layout.num_replicas if layout else None,
        micro_batches=options.num_microbatches,
        max_micro_batches=min(config.max_micro_batches, replica_batch_size),
        min_micro_batch_size=config.min_micro_batch_size,
        schedule=config.schedule,
        virtual_stages=options.search_virtual_stages,
        activation_checkpointing=options.checkpointing,
        zero_bubble=options.search_zero_bubble,
        epoch_samples=options.epoch_samples,
        zero_stage=options.zero_stage,
        offload_optimizer=options.offload_optimizer,
        accumulating=options.accumulating,
    )


def choose_layout(
    module: nn.Module,
    batch: Any,
    options: EngineOptions,
    num_devices: int,
    device: torch.device,
    cache: ProfileCache,
) -> Layout:
    """Stages x replicas for ``num_devices`` with the most samples per second (rank 0 only):
    from the deployment if there is one, else by the search over every layout, on the costs of
    ``batch`` (one replica's batch, as the data loader gives it)."""
    deployment = options.config.deployment
    if deployment is not None and Path(deployment).exists():
        return _deployed_layout(deployment, num_devices)
    flat = FlatBatch.of(batch, where_defined(type(module).training_step))  # type: ignore[attr-defined]
    num_microbatches = reference_microbatches(flat.size, options.num_microbatches, 1)
    with captured_for_costs(module, flat, num_microbatches, device) as (graph, micro, analytic):
        samples = timing_samples(module, flat, flat.size // num_microbatches, options)
        costs = block_costs(graph, micro, options, cache, analytic, samples)
        settings = search_settings(options, num_devices=num_devices, replica_batch_size=flat.size, layout=None)
        if options.num_microbatches is not None:  # the count that divides this batch, as the engine runs it
            settings = dataclasses.replace(settings, micro_batches=num_microbatches)
        try:
            result = _search(costs, flat.size // num_microbatches, settings, graph)
        except PlanError as error:
            raise _with_lower_precisions(error, module, flat, settings, options) from None
    plan = result.plan
    return Layout(plan.pipeline_stages, plan.num_replicas, _describe(result, flat.size), plan)


def _search(costs: list[BlockCost], microbatch_size: int, settings: SearchSettings, graph: StepGraph) -> SearchResult:
    started = time.perf_counter()
    result = search_plan(
        costs,
        reference_microbatch_size=microbatch_size,
        settings=settings,
        tensors=tensor_table(graph.tensors),
        graph_fingerprint=graph.fingerprint(),
    )
    log.info("searched %d candidate plans in %.2f s", len(result.candidates), time.perf_counter() - started)
    choice = microbatch_choice(result.plan, result.candidates)
    if choice is not None:
        log.info(choice)
    return result


def _with_lower_precisions(
    error: PlanError, module: nn.Module, batch: FlatBatch, settings: SearchSettings, options: EngineOptions
) -> PlanError:
    """``error`` with each lower precision than the Trainer's in which a plan fits added to its
    remedies (planned as the dry run does: analytic costs, the module left as it is)."""
    if not error.problem:
        return error  # not a refusal for memory: another precision would not help
    try:
        lower = precision_remedies(module, batch, settings, options.config.max_blocks, options.precision)
    except Exception as failure:  # best effort: the refusal itself must reach the user
        log.debug("could not plan the step in a lower precision for the refusal's remedies: %r", failure)
        return error
    return error.with_remedies(lower)


def _deployed_layout(path: str, num_devices: int) -> Layout:
    plan = PartitionPlan.load(path)
    if plan.world_size != num_devices:
        raise PlanError(
            f"The deployment {path!r} was planned for {plan.world_size} device(s), not {num_devices}. Delete it "
            "to plan again, or run on the devices it was made for."
        )
    return Layout(plan.pipeline_stages, plan.num_replicas, f"layout from deployment {path}")


def _describe(result: SearchResult, replica_batch: int) -> str:
    plan = result.plan
    rate = replica_batch * plan.num_replicas / plan.predicted_step_ms * 1e3
    compared = sorted({(c.stages, c.replicas) for c in result.candidates if c.step_ms is not None})
    return (
        f"layout: {plan.pipeline_stages} stage(s) x {plan.num_replicas} replica(s), predicted {rate:.1f} samples/s "
        f"(the best of {len(compared)} feasible layouts; pass pipeline_stages=N to force one); a step trains on "
        f"{plan.num_replicas} batch(es) of {replica_batch}"
    )


# --- the plan of the first batch, with the layout fixed --------------------------------------------


@dataclass(frozen=True)
class PlanRequest:
    """What rank 0 plans from at the first batch: the step's graph at the micro-batch size."""

    graph: StepGraph
    micro_leaves: list[torch.Tensor]
    num_microbatches: int
    analytic: bool
    """Costs estimated for the device preset (fake tensors: a module on the meta device)."""
    samples: list[ResizedSample]
    """Micro-batches of other sizes to time the blocks on too (``captures.timing_samples``)."""
    where: str
    """``file:line`` of the step, for errors."""
    module: nn.Module
    batch: FlatBatch
    """The first batch (for a refusal's remedies in another precision)."""


def deployed_or_new_plan(request: PlanRequest, options: EngineOptions, cache: ProfileCache) -> PartitionPlan:
    """RaNNC's save/load_deployment: reuse a saved plan when it fits this run, else plan."""
    path = options.config.deployment
    if path is None or not Path(path).exists():
        plan = _make_plan(request, options, cache)
        if path is not None:
            plan.save(path)
            log.info("saved the plan as deployment %s", path)
        return plan
    plan = PartitionPlan.load(path)
    forced = {
        "num_microbatches": None if options.num_microbatches is None else request.num_microbatches,
        "virtual_stages": options.search_virtual_stages,
        "zero_bubble": options.search_zero_bubble,
    }
    plan.check_matches(
        path,
        graph_fingerprint=request.graph.fingerprint(),
        world_size=options.pipeline_stages * options.num_replicas,
        num_replicas=options.num_replicas,
        replica_batch_size=int(request.micro_leaves[0].shape[0]) * request.num_microbatches,
        **{name: value for name, value in forced.items() if value is not None},
    )
    log.info("loaded deployment %s: no profiling, no search", path)
    return plan


def _make_plan(request: PlanRequest, options: EngineOptions, cache: ProfileCache) -> PartitionPlan:
    graph, micro_leaves = request.graph, request.micro_leaves
    num_stages = options.pipeline_stages * (options.search_virtual_stages or 1)
    num_blocks = len(group_nodes(graph, options.config.max_blocks))
    if num_blocks < num_stages:
        raise PlanError(
            f"The training step of {type(request.module).__name__} ({request.where}) splits into only "
            f"{num_blocks} block(s), fewer than the {num_stages} pipeline stages asked for: "
            "use fewer pipeline stages, or raise max_blocks."
        )
    costs = block_costs(graph, micro_leaves, options, cache, request.analytic, request.samples)
    microbatch_size = int(micro_leaves[0].shape[0])
    # The layout is fixed: the strategy chose it at setup, before the data loaders were sharded.
    settings = search_settings(
        options,
        num_devices=options.pipeline_stages * options.num_replicas,
        replica_batch_size=microbatch_size * request.num_microbatches,
        layout=Layout(options.pipeline_stages, options.num_replicas, ""),
    )
    if options.num_microbatches is not None:  # the count that divides this batch
        settings = dataclasses.replace(settings, micro_batches=request.num_microbatches)
    try:
        plan = _search(costs, microbatch_size, settings, graph).plan
    except PlanError as error:
        raise _with_lower_precisions(error, request.module, request.batch, settings, options) from None
    plan.no_grad_values = find_no_grad_values(graph, micro_leaves, [s.node_start for s in plan.stages[1:]])
    _check_written_buffers(plan, graph, request.where)
    return plan


def _check_written_buffers(plan: PartitionPlan, graph: StepGraph, where: str) -> None:
    for name in set(graph.written_buffers):
        users = [s.stage_index for s in plan.stages if name in s.tensor_names]
        if len(users) > 1:
            raise PlanError(
                f"The buffer `{name}` is updated in place by `training_step` ({where}) and used by "
                f"stages {users}: its copies would diverge. Use fewer pipeline stages or a larger max_blocks."
            )
