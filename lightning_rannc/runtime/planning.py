"""Rank 0's planning work: capture the step for one micro-batch, cost its blocks, search.

Two callers share it. The strategy chooses the layout (stages x replicas) at ``setup``, before
Lightning shards the data loaders over the replicas, from a sample batch; the engine then makes
the plan at the first batch with that layout fixed. Both get the block costs through one
``ProfileCache``, so the model is profiled once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_rannc._utils import where_defined
from lightning_rannc.capture.export import (
    CapturedStep,
    capture_step,
    capture_training_step,
    fake_module_state,
    flatten_batch,
    module_tensors,
)
from lightning_rannc.capture.graph import StepGraph, group_nodes
from lightning_rannc.errors import PlanError, RuntimeSetupError
from lightning_rannc.plan.cost_model import BlockCost, with_fixed_parts
from lightning_rannc.plan.devices import DeviceSpec, get_device
from lightning_rannc.plan.plan import PartitionPlan, choose_microbatches
from lightning_rannc.plan.search import SearchResult, SearchSettings, search_plan
from lightning_rannc.profile.analytic import estimate_blocks
from lightning_rannc.profile.cache import ProfileCache, profile_key
from lightning_rannc.profile.profiler import profile_blocks
from lightning_rannc.profile.tensors import tensor_table

__all__ = ["EngineOptions", "Layout", "choose_layout", "batch_size_of", "reference_microbatches", "smaller_sample"]

log = logging.getLogger("lightning_rannc")

UNLIMITED = 2**62
"""Bytes: "no memory limit" for the search."""
_REFERENCE_MICROBATCHES = 4
"""When the search picks the micro-batch count, costs are measured for micro-batches of a
quarter of the batch (where the batch allows) and scaled to the other sizes; see also
``smaller_sample``."""
_SMALLEST_TIMED = 2
"""Fewest samples of the second timing: one sample times the noisiest, and BatchNorm in
training refuses a batch with one value per channel."""


@dataclass(frozen=True)
class SmallerSample:
    """A smaller micro-batch to time the blocks on: its size, and a call that captures the step
    on it and returns the graph and the micro-batch's leaves."""

    size: int
    capture: Callable[[], tuple[StepGraph, list[torch.Tensor]]]


@dataclass(kw_only=True, frozen=True)
class EngineOptions:
    pipeline_degree: int
    """Ranks per pipeline (S)."""
    num_replicas: int = 1
    """Data-parallel copies of the pipeline (D)."""
    virtual_stages: int = 1
    num_microbatches: int | None = 4
    """``None``: the search picks it, within the next two bounds."""
    max_microbatches: int = 64
    min_microbatch_size: int = 1
    schedule: str = "auto"
    checkpointing: bool | None = False
    """``None``: only the stages that need it to fit ``memory_limit``."""
    memory_limit: int | None = None
    """Bytes per device; ``None``: unlimited."""
    memory_margin: float = 0.1
    device_preset: str = "cpu"
    """``DEVICES`` entry for link bandwidths and (meta modules) analytic costs."""
    device: DeviceSpec | None = None
    """The device description to plan with (measured links); ``None``: the preset's."""
    devices_per_node: int = 8
    """Ranks per node: links between them are intra-node."""
    optimizer: str = "adamw"
    """Optimizer state kind for the memory model (``memory.OPTIMIZER_STATE``)."""
    max_blocks: int = 64
    profile_repeats: int = 3
    deployment: str | None = None
    """A plan file: loaded when it exists (no profiling, no search), written otherwise."""
    verify: bool = False
    """Compare the first step with the unpartitioned step (``runtime/verify.py``)."""
    zero_bubble: bool = False
    """Plans run their 1F1B schedule as zero bubble (``PartitionPlan.zero_bubble``)."""
    verify_tolerance: float = 1e-3

    @property
    def device_spec(self) -> DeviceSpec:
        return self.device if self.device is not None else get_device(self.device_preset)

    @property
    def search_virtual_stages(self) -> int:
        """Stages per rank: interleaving only when asked for (a schedule of whole rounds of S
        micro-batches cannot take every last batch's count), with 2 stages per rank by default."""
        if self.schedule == "interleaved_1f1b":
            return max(2, self.virtual_stages)
        return self.virtual_stages


@dataclass(frozen=True)
class Layout:
    """The strategy's choice at setup: stages per pipeline and replicas."""

    pipeline_degree: int
    num_replicas: int
    summary: str
    plan: PartitionPlan | None = None
    """The plan the search predicted for the layout (``None`` from a deployment)."""


def batch_size_of(leaves: list[torch.Tensor], where: str) -> int:
    sizes = {int(leaf.shape[0]) if leaf.dim() else -1 for leaf in leaves}
    if len(sizes) != 1 or -1 in sizes:
        raise RuntimeSetupError(
            f"Every tensor in the batch given to `training_step` ({where}) must have the batch "
            f"size as its first dimension; got first dimensions {sorted(sizes)}."
        )
    return sizes.pop()


def reference_microbatches(batch_size: int, requested: int | None, minimum: int) -> int:
    """Micro-batches the step is captured and costed for: the requested count (or the nearest
    that divides the batch), or when the search picks it, a reference count."""
    return choose_microbatches(batch_size, requested or _REFERENCE_MICROBATCHES, minimum)


def capture_micro(module: nn.Module, batch: Any, num_microbatches: int, where: str) -> tuple[CapturedStep, StepGraph]:
    """Capture the step for the first micro-batch of ``batch`` with the module's own tensors."""
    leaves, spec = flatten_batch(batch, where)
    size = batch_size_of(leaves, where) // num_microbatches
    captured = capture_training_step(module, spec.unflatten([leaf[:size] for leaf in leaves]))
    return captured, StepGraph.from_captured(captured)


@contextlib.contextmanager
def fake_capture(
    module: nn.Module,
    batch: Any,
    num_microbatches: int,
    where: str,
    device: torch.device,
    step_name: str = "training_step",
    extra_args: tuple[Any, ...] = (),
) -> Iterator[tuple[CapturedStep, StepGraph, list[torch.Tensor]]]:
    """Capture the step with fake tensors standing in for the module's and the batch's (other
    stages' tensors are freed or were never allocated). Yields the capture, its graph and the
    fake micro-batch leaves, valid inside the block."""
    leaves, spec = flatten_batch(batch, where, step_name)
    size = batch_size_of(leaves, where) // num_microbatches
    with fake_module_state(module, device) as mode:
        micro = [mode.from_tensor(leaf[:size]) for leaf in leaves]
        captured = capture_step(module, spec.unflatten(micro), step_name, extra_args)
        yield captured, StepGraph.from_captured(captured), micro


def smaller_sample(
    module: nn.Module, batch: Any, where: str, microbatch_size: int, options: EngineOptions
) -> SmallerSample | None:
    """When the search picks the micro-batch count: the step on the smallest micro-batch it may
    choose, captured when called, so that ``block_costs`` can time the blocks at two sizes.
    ``None`` when the count is given (costs are measured at that size), or when no micro-batch
    of at most half ``microbatch_size`` is allowed (two close sizes give a noisy intercept)."""
    if options.num_microbatches is not None:
        return None
    leaves, spec = flatten_batch(batch, where)
    fewest_samples = -(-batch_size_of(leaves, where) // options.max_microbatches)  # with the most micro-batches
    smallest = max(options.min_microbatch_size, _SMALLEST_TIMED, fewest_samples)
    if 2 * smallest > microbatch_size:
        return None

    def capture() -> tuple[StepGraph, list[torch.Tensor]]:
        micro = [leaf[:smallest] for leaf in leaves]
        return StepGraph.from_captured(capture_training_step(module, spec.unflatten(micro))), micro

    return SmallerSample(smallest, capture)


def block_costs(
    graph: StepGraph,
    micro_leaves: list[torch.Tensor],
    options: EngineOptions,
    cache: ProfileCache,
    analytic: bool,
    smaller: SmallerSample | None = None,
) -> list[BlockCost]:
    """Costs of the graph's blocks for one micro-batch: analytic for the device preset when the
    tensors are fake (nothing can run), else measured on this device, and with ``smaller`` also
    on a smaller micro-batch, for the part of each time that does not shrink with it (the
    analytic costs have that part already); through ``cache``."""
    spans = group_nodes(graph, options.max_blocks)
    device = options.device_spec
    smaller = None if analytic else smaller
    method = f"analytic:{device.name}" if analytic else "measured"
    if smaller is not None:
        method += f", and at {smaller.size} samples"
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
        costs = profile_blocks(graph, micro_leaves, spans, options.profile_repeats)
        if smaller is not None:
            costs = _with_smaller_timings(costs, spans, int(micro_leaves[0].shape[0]), smaller, options)
    cache.store(key, costs)
    how = f"estimated for {device.name}" if analytic else "profiled"
    log.info("%s %d blocks of %d nodes in %.1f s", how, len(spans), len(graph), time.perf_counter() - started)
    return costs


def _with_smaller_timings(
    costs: list[BlockCost], spans: list[tuple[int, int]], size: int, smaller: SmallerSample, options: EngineOptions
) -> list[BlockCost]:
    """``costs`` (micro-batches of ``size``) with fixed parts from the blocks timed again on the
    smaller micro-batch. The second timing only refines the costs: when the step cannot be
    captured or run on that micro-batch, or splits into other blocks, they stay as they were
    (times in proportion to the micro-batch size)."""
    try:
        graph, leaves = smaller.capture()
        if group_nodes(graph, options.max_blocks) != spans:
            raise ValueError("the step splits into other blocks")
        small = profile_blocks(graph, leaves, spans, options.profile_repeats)
    except Exception as error:
        log.warning(
            "could not time the step on micro-batches of %d samples (%s): other micro-batch sizes are "
            "costed in proportion to %d samples",
            smaller.size,
            error,
            size,
        )
        return costs
    return with_fixed_parts(costs, small, size, smaller.size)


def _hardware(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def search_settings(
    options: EngineOptions, *, num_devices: int, replica_batch_size: int, layout: Layout | None
) -> SearchSettings:
    """The search's settings from the strategy's options; ``layout`` fixes stages and replicas."""
    return SearchSettings(
        num_devices=num_devices,
        global_batch_size=replica_batch_size * num_devices,
        replica_batch_size=replica_batch_size,
        device=options.device_spec,
        devices_per_node=options.devices_per_node,
        memory_limit=options.memory_limit if options.memory_limit is not None else UNLIMITED,
        memory_margin=options.memory_margin,
        optimizer=options.optimizer,
        pipeline_stages=layout.pipeline_degree if layout else None,
        replicas=layout.num_replicas if layout else None,
        micro_batches=options.num_microbatches,
        max_microbatches=min(options.max_microbatches, replica_batch_size),
        min_microbatch_size=options.min_microbatch_size,
        schedule=options.schedule,
        virtual_stages=options.search_virtual_stages,
        checkpointing=options.checkpointing,
        zero_bubble=options.zero_bubble,
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
    where = where_defined(type(module).training_step)  # type: ignore[attr-defined]
    if options.deployment is not None and Path(options.deployment).exists():
        return _deployed_layout(options.deployment, num_devices)
    leaves, _ = flatten_batch(batch, where)
    size = batch_size_of(leaves, where)
    num_microbatches = reference_microbatches(size, options.num_microbatches, 1)
    with _captured_for_costs(module, batch, num_microbatches, where, device) as (graph, micro, analytic):
        smaller = smaller_sample(module, batch, where, size // num_microbatches, options)
        costs = block_costs(graph, micro, options, cache, analytic, smaller)
        settings = search_settings(options, num_devices=num_devices, replica_batch_size=size, layout=None)
        if options.num_microbatches is not None:  # the count that divides this batch, as the engine runs it
            settings = dataclasses.replace(settings, micro_batches=num_microbatches)
        started = time.perf_counter()
        result = search_plan(
            costs,
            reference_microbatch_size=size // num_microbatches,
            settings=settings,
            tensors=tensor_table(graph.tensors),
            graph_fingerprint=graph.fingerprint(),
        )
    log.info("searched %d candidate plans in %.2f s", len(result.candidates), time.perf_counter() - started)
    plan = result.plan
    return Layout(plan.pipeline_degree, plan.num_replicas, _describe(result, size), plan)


@contextlib.contextmanager
def _captured_for_costs(
    module: nn.Module, batch: Any, num_microbatches: int, where: str, device: torch.device
) -> Iterator[tuple[StepGraph, list[torch.Tensor], bool]]:
    """The graph and micro-batch to cost: real ones, or fake ones for a module on the meta device."""
    started = time.perf_counter()
    if any(t.is_meta for t in module_tensors(module).values()):
        with fake_capture(module, batch, num_microbatches, where, device) as (_, graph, micro):
            log.info("captured the step on fake tensors in %.1f s", time.perf_counter() - started)
            yield graph, micro, True
        return
    _, graph = capture_micro(module, batch, num_microbatches, where)
    log.info("captured the step in %.1f s (%d nodes)", time.perf_counter() - started, len(graph))
    leaves, _ = flatten_batch(batch, where)
    size = batch_size_of(leaves, where) // num_microbatches
    yield graph, [leaf[:size] for leaf in leaves], False


def _deployed_layout(path: str, num_devices: int) -> Layout:
    plan = PartitionPlan.load(path)
    if plan.world_size != num_devices:
        raise PlanError(
            f"The deployment {path!r} was planned for {plan.world_size} device(s), not {num_devices}. Delete it "
            "to plan again, or run on the devices it was made for."
        )
    return Layout(plan.pipeline_degree, plan.num_replicas, f"layout from deployment {path}")


def _describe(result: SearchResult, replica_batch: int) -> str:
    plan = result.plan
    rate = replica_batch * plan.num_replicas / plan.predicted_step_ms * 1e3
    compared = sorted({(c.stages, c.replicas) for c in result.candidates if c.step_ms is not None})
    return (
        f"layout: {plan.pipeline_degree} stage(s) x {plan.num_replicas} replica(s), predicted {rate:.1f} samples/s "
        f"(the best of {len(compared)} feasible layouts; pass pipeline_stages=N to force one); a step trains on "
        f"{plan.num_replicas} batch(es) of {replica_batch}"
    )
