"""One rank's pipeline once it exists: the plan, this rank's tensors, and stages per batch shape.

``PipelineEngine.build`` makes it at the first training batch; everything here exists from then
on. A batch of another shape (a smaller last batch, another sequence length) is captured again
and gets its own stage objects for the same plan: nothing is re-planned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from lightning_rannc._compat import attached_trainer
from lightning_rannc.capture.batch import FlatBatch, ShapeKey
from lightning_rannc.capture.export import CapturedStep
from lightning_rannc.capture.graph import StepGraph, align_nodes
from lightning_rannc.capture.guards import Source
from lightning_rannc.capture.module_state import module_tensors
from lightning_rannc.capture.watching import current_numbers
from lightning_rannc.errors import RuntimeSetupError
from lightning_rannc.plan.plan import PartitionPlan
from lightning_rannc.runtime.captures import fake_capture
from lightning_rannc.runtime.evaluation import PipelinedEvaluation, check_combinable, moved_stages
from lightning_rannc.runtime.mesh import ProcessGroups
from lightning_rannc.runtime.offload import HostOptimizer
from lightning_rannc.runtime.optim import (
    broadcast_from_owners,
    clip_grad_norm,
    gather_optimizer_state,
    keep_local_params,
    load_full_optimizer_state,
    local_optimizer_state,
)
from lightning_rannc.runtime.pipeline import PipelineRuntime
from lightning_rannc.runtime.replay import replay_logs, step_output
from lightning_rannc.runtime.state import gather_tensors, install_tensors, local_tensors, release_tensors
from lightning_rannc.runtime.trace import EventTrace
from lightning_rannc.runtime.variants import Variant, Variants, numbers_read
from lightning_rannc.runtime.verify import Reference, check_against_reference
from lightning_rannc.runtime.weights import apply_pending_loads

__all__ = ["BuiltPipeline", "Ownership", "warn_if_adjusted"]


log = logging.getLogger("lightning_rannc")


@dataclass(kw_only=True)
class Ownership:
    """Which tensors this rank holds and updates, by canonical name."""

    local: set[str]
    """Its stages' parameters, buffers and constants."""
    owned: set[str]
    """What it contributes to a gathered state dict: its stages' tensors on the first replica,
    and on rank 0 the tensors no stage uses."""
    optimizer_owner: dict[str, int]
    """Trainable tensor -> the replica whose optimizer updates it (sharded optimizer state)."""
    names: dict[int, str]
    """``id(tensor)`` -> canonical name, for the optimizers' parameters."""
    updated_elsewhere: list[str] = field(default_factory=list)
    """This rank's trainable tensors another replica's optimizer updates."""
    layouts: dict[int, list[list[str]]] = field(default_factory=dict)
    """Per optimizer: the canonical names of each parameter group's full parameter list."""
    holders: dict[str, int] = field(default_factory=dict)
    """ZeRO-3: each parameter of this rank's stages -> the one replica holding it (the others
    gather it where they use it, ``runtime/zero3.py``)."""
    elsewhere: set[str] = field(default_factory=set)
    """ZeRO-3: this rank's parameters another replica holds (meta tensors here)."""

    @property
    def held(self) -> set[str]:
        """The tensors whose values this rank keeps."""
        return (self.local - self.elsewhere) | self.owned


class BuiltPipeline:
    """This rank's part of the planned, pipelined training step of ``module``."""

    def __init__(
        self,
        *,
        module: nn.Module,
        plan: PartitionPlan,
        captured: CapturedStep,
        graph: StepGraph,
        ownership: Ownership,
        rank: int,
        device: torch.device,
        groups: ProcessGroups,
        seed: int,
        where: str,
        verify_tolerance: float,
        trace: EventTrace | None = None,
    ) -> None:
        self.module, self.plan, self.captured = module, plan, captured
        self.ownership = ownership
        self.rank, self.device, self.groups = rank, device, groups
        self.seed, self.where, self.trace = seed, where, trace
        self.node_keys, self.node_names = graph.node_keys(), [n.name for n in graph.nodes]
        self.runtimes: dict[ShapeKey, Variants[PipelineRuntime]] = {}
        """Per batch shape: the stages of each capture of the step (one per branch it takes)."""
        self.last_runtime: PipelineRuntime | None = None
        self._last_captured = captured
        self._numbers: dict[Source, Any] = {}
        """The last step's values of the changing numbers the step reads (``capture/guards.py``)."""
        self.reference: Reference | None = None
        """The unpartitioned first step, compared with the first pipelined step (``verify``)."""
        self.steps = 0
        self.evaluation = PipelinedEvaluation(self)
        self._verify_tolerance = verify_tolerance
        self.offloaded: list[HostOptimizer] = []
        """The optimizers stepping in host memory (``plan.offload_optimizer``)."""
        self.host_names: dict[int, str] = {}
        """``id`` -> canonical name of their parameters' host copies."""

    # --- training steps -----------------------------------------------------------------------

    def run(self, batch: FlatBatch, batch_idx: int, loss_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """One training step; the loss and logged values, the same on every rank. Collective."""
        variant = self._variant_for(batch, batch_idx)
        runtime = self.last_runtime = variant.entry
        self._last_captured = variant.captured
        self.steps += 1
        if self.trace is not None:
            self.trace.start_step()
        # Lightning zeroes the gradients after the first step of each accumulation window.
        trainer = attached_trainer(self.module)
        window_starts = trainer is None or batch_idx % trainer.accumulate_grad_batches == 0
        values = runtime.run(batch.leaves, self.seed, self.steps, loss_scale, keep_grads=not window_starts)
        if self.reference is not None:
            grads = {self.ownership.names[id(p)]: g for p, g in runtime.pending_grads().items()}
            if self.plan.zero_stage in (2, 3):  # each replica compares the gradients it holds
                grads = {n: g for n, g in grads.items() if self.ownership.optimizer_owner.get(n) == self.groups.dp_rank}
            reference, self.reference = self.reference, None
            scale = float(loss_scale)  # once, at the first step
            compared = set(grads) if self.plan.zero_stage in (2, 3) else None
            check_against_reference(
                reference, float(values[0]), grads, self.groups, self._verify_tolerance, scale, compared
            )
        self._share_written_buffers()
        return values

    def check_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        """``terminate_on_nan``: the loss is shared, so every rank raises here, at the same step."""
        if torch.isfinite(loss):
            return
        step = self.module.trainer.global_step  # type: ignore[union-attr]
        raise ValueError(
            f"`training_step` ({self.where}) returned a loss of {float(loss)} at batch {batch_idx} "
            f"(step {step}); stopping because RaNNCStrategy(terminate_on_nan=True)."
        )

    def replay_logs(self, values: torch.Tensor) -> None:
        """Replay the training step's ``self.log`` and metric calls with the last step's values."""
        tensor_outputs = self.last_runtime.tensor_outputs if self.last_runtime is not None else []
        replay_logs(self.module, self._last_captured, values, tensor_outputs, self._numbers)

    def step_output(self, values: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        tensor_outputs = self.last_runtime.tensor_outputs if self.last_runtime is not None else []
        return step_output(self._last_captured, values, tensor_outputs)

    def add_runtime(
        self, key: ShapeKey, graph: StepGraph, num_microbatches: int, captured: CapturedStep
    ) -> Variant[PipelineRuntime]:
        """Stages for batches of shapes ``key``, from ``graph`` (the step captured for them)."""
        plan = self._plan_for(graph, num_microbatches)
        first_tensor = captured.first_tensor_output
        microbatch_size = int(graph.inputs[0].meta["val"].shape[0]) if graph.inputs else 1
        named = f"`training_step` ({self.where})"
        for offset, returned in enumerate(captured.tensor_extra_keys):
            check_combinable([graph.outputs[first_tensor + offset]], microbatch_size, f"{named}, key {returned!r},")
        check_combinable(graph.outputs[first_tensor:], microbatch_size, named)
        runtime = PipelineRuntime(
            graph,
            plan,
            self.rank,
            self.device,
            self.groups,
            self.trace,
            num_scalar_outputs=first_tensor,
            reductions=captured.output_reductions,
            owners=self.ownership.optimizer_owner,
            holders=self.ownership.holders,
        )
        variants = self.runtimes.setdefault(key, Variants(named))
        return variants.add(captured if captured is self.captured else _without_tensors(captured), runtime)

    def _variant_for(self, batch: FlatBatch, batch_idx: int) -> Variant[PipelineRuntime]:
        """The stages for this step: those captured for its batch shape and for what its numbers
        decide (the branches it takes), captured now if there are none yet."""
        key = batch.shape_key
        variants = self.runtimes.get(key)
        captures = [v.captured for shape in self.runtimes.values() for v in shape.variants]
        self._numbers = current_numbers(self.module, batch_idx, numbers_read(captures))
        found = variants.find(self._numbers) if variants is not None else None
        if found is not None:
            return found
        num_microbatches = self.plan.microbatches_for(batch.size)
        warn_if_adjusted(batch.size, self.plan.num_microbatches, num_microbatches)
        log.debug("batch %d (shapes %s) takes a path not captured yet: capturing the step for it", batch_idx, key)
        captured, graph = self.capture_again(batch, num_microbatches, batch_idx)
        variant = self.add_runtime(key, graph, num_microbatches, captured)
        self._numbers = current_numbers(self.module, batch_idx, numbers_read([captured, *captures]))
        return variant

    def capture_again(self, batch: FlatBatch, num_microbatches: int, batch_idx: int) -> tuple[CapturedStep, StepGraph]:
        """Capture the step for another batch shape (or another path through it); the graph uses
        this rank's real tensors."""
        capture = fake_capture(self.module, batch, num_microbatches, self.device, batch_idx=batch_idx)
        with capture as (captured, graph, _):
            pass
        graph.tensors = self.captured.tensors  # this rank's parameters, buffers and constants
        return captured, graph

    def _plan_for(self, graph: StepGraph, num_microbatches: int) -> PartitionPlan:
        """The plan, with its node ranges moved onto another capture of the step (another shape)."""
        plan = dataclasses.replace(self.plan, num_microbatches=num_microbatches)
        if graph.fingerprint() == plan.graph_fingerprint:
            return plan
        matched = align_nodes(self.node_keys, graph.node_keys())
        stages = moved_stages(plan, matched, len(graph))
        names = {i: n.name for i, n in enumerate(graph.nodes)}
        no_grad = [
            names[matched[i]] for i, n in enumerate(self.node_names) if n in plan.no_grad_values and i in matched
        ]
        plan = dataclasses.replace(plan, stages=stages, no_grad_values=no_grad)  # names of the new graph
        for stage in plan.stages_of_rank(self.rank):
            missing = set(graph.tensor_names(stage.node_start, stage.node_end)) - set(self.captured.tensors)
            if stage.node_start >= stage.node_end or missing:
                raise RuntimeSetupError(
                    f"A batch of another shape changes the graph of `training_step` ({self.where}) so much "
                    f"that stage {stage.stage_index} no longer matches the plan (needs {sorted(missing)}). "
                    "Use fixed batch shapes (drop_last=True, padding to one length)."
                )
        return plan

    def _share_written_buffers(self) -> None:
        """Replicas see different data; like DDP, every replica takes replica 0's buffers."""
        if self.groups.num_replicas == 1:
            return
        src = self.groups.replica_rank(0)
        for name in sorted(set(self.captured.written_buffers) & self.ownership.local):
            dist.broadcast(self.captured.tensors[name], src=src, group=self.groups.dp_group)

    # --- around the optimizer step -----------------------------------------------------------

    def accumulate_grads(self, scale: float) -> None:
        assert self.last_runtime is not None, "backward before a training step"
        self.last_runtime.accumulate_grads(scale)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip this rank's gradients by the norm over the whole model (all stages). Collective."""
        first_holder = _first_holders(self.plan)
        tensors = self.captured.tensors
        params = {n: tensors[n] for n in sorted(self.ownership.held) if n in tensors}
        counted = [p for n, p in params.items() if first_holder.get(n) == self.groups.pp_rank]
        if self.plan.zero_stage not in (2, 3):
            return clip_grad_norm(list(params.values()), counted, max_norm, self.groups.pp_group, self.device)
        # ZeRO-2 and 3: each replica holds its share of the gradients only; the shares of all
        # ranks make the model's norm.
        own, owner = self.groups.dp_rank, self.ownership.optimizer_owner
        counted = [p for n, p in params.items() if first_holder.get(n) == self.groups.pp_rank and owner.get(n) == own]
        return clip_grad_norm(list(params.values()), counted, max_norm, None, self.device)

    def unscale_updated_elsewhere(self, inv_scale: float | torch.Tensor) -> None:
        """Unscale the gradients the optimizer does not hold (it unscales its own): they enter
        the gradient norm."""
        for name in self.ownership.updated_elsewhere:
            grad = self.captured.tensors[name].grad
            if grad is not None:
                grad.mul_(inv_scale)

    def after_optimizer_step(self) -> None:
        """Share the parameters each replica updated with the others (sharded optimizer state)."""
        if self.groups.num_replicas > 1:
            # ZeRO-3's parameters stay on the replica that updated them.
            owner, holders = self.ownership.optimizer_owner, self.ownership.holders
            shared = {n: r for n, r in owner.items() if n not in holders}
            with self._span("updated parameters shared by replicas"):
                broadcast_from_owners(self.captured.tensors, shared, self.groups)
        # Lightning's zero_grad only reaches parameters in the optimizer; the others' gradients
        # (kept for the gradient norm) must not leak into the next accumulation window.
        for name in self.ownership.updated_elsewhere:
            self.captured.tensors[name].grad = None

    def _span(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self.trace.span(name, "collective") if self.trace is not None else contextlib.nullcontext()

    def restrict_optimizers(self, optimizers: list[Optimizer]) -> None:
        """Keep in the user's optimizers only the parameters whose optimizer state this rank
        holds (its stages', sharded over replicas), then free other stages' memory."""
        owner, own = self.ownership, self.groups.dp_rank
        keep = {n for n in owner.local if owner.optimizer_owner.get(n, own) == own}
        owner.updated_elsewhere = sorted(set(owner.optimizer_owner) - keep)
        for index, optimizer in enumerate(optimizers):
            # Parameters materialised from the meta device (and ZeRO-3's stand-ins for those other
            # replicas hold) are new objects: put them in the groups, with any state loaded for
            # the old ones.
            for group in optimizer.param_groups:
                current = [self.captured.tensors.get(owner.names[id(p)], p) for p in group["params"]]
                for old, new in zip(group["params"], current):
                    if new is not old and old in optimizer.state:
                        optimizer.state[new] = optimizer.state.pop(old)
                group["params"] = current
            owner.layouts[index] = keep_local_params(optimizer, owner.names, keep)
        owner.names = {i: n for i, n in owner.names.items() if n in owner.held}
        if self.plan.offload_optimizer:
            names = dict(owner.names)
            self.offloaded = [HostOptimizer(optimizer, names) for optimizer in optimizers]
            self.host_names = {i: n for i, n in names.items() if i not in owner.names}
        self.release()

    def load_optimizer_states(self, optimizers: list[Optimizer], states: list[dict[str, Any]]) -> None:
        """Load each optimizer's share of a checkpoint's full states (a module created on the meta
        device, resumed: the states waited for the parameters to exist)."""
        if len(states) != len(optimizers):
            raise RuntimeSetupError(
                f"The checkpoint holds {len(states)} optimizer state(s), but `configure_optimizers` of "
                f"{type(self.module).__name__} made {len(optimizers)}: resume with the optimizers it was saved with."
            )
        for index, (optimizer, state) in enumerate(zip(optimizers, states)):
            load_full_optimizer_state(optimizer, self.ownership.layouts[index], self.optimizer_names, state)

    @property
    def optimizer_names(self) -> dict[int, str]:
        """``id`` -> canonical name of the optimizers' parameters (host copies when offloaded)."""
        return {**self.ownership.names, **self.host_names}

    # --- where the tensors are ------------------------------------------------------------------

    def apply_pending_loads(self) -> None:
        """Load what ``load_pretrained`` (or a checkpoint) noted into the tensors this rank holds."""
        held = self.ownership.held
        current = module_tensors(self.module)
        targets = {n: t for n, t in current.items() if n in held and not t.is_meta}
        apply_pending_loads(self.module, self.captured.aliases, targets)

    def rebind(self, groups: ProcessGroups) -> None:
        """Use new process groups (a later ``validate``/``test``/``predict``): the stages made
        with the old ones are dropped and built again when needed."""
        self.groups = groups
        self.runtimes.clear()
        self.evaluation = PipelinedEvaluation(self)
        self.last_runtime = None
        # Moving the module between devices (teardown, setup) replaces buffer objects.
        current = module_tensors(self.module)
        self.captured.tensors = {n: current.get(n, t) for n, t in self.captured.tensors.items()}
        self.ownership.names = {id(t): n for n, t in self.captured.tensors.items()}

    def release(self) -> None:
        """Free every tensor this rank does not hold (they become meta tensors in the module)."""
        release_tensors(self.module, self.captured.aliases, self.ownership.held)

    def materialize(self) -> None:
        """Give every rank the whole module again (for evaluation and after fit). Collective."""
        values = self._gathered(None)
        install_tensors(self.module, self.captured.aliases, values, self.device)

    def full_state_dict(self, dst: int | None) -> dict[str, torch.Tensor]:
        """The unpartitioned module's state dict on ``dst`` (``None``: every rank). Collective."""
        values = self._gathered(dst)
        if dst is not None and self.rank != dst:
            return {}
        return {key: values[self.captured.aliases[key]] for key in self.captured.state_dict_keys}

    def _gathered(self, dst: int | None) -> dict[str, torch.Tensor]:
        """Every rank's owned tensors on ``dst`` (``None``: every rank), in bounded pieces."""
        local = local_tensors(self.captured.tensors, sorted(self.ownership.owned))
        return gather_tensors(local, dst, self.groups.cpu_group)

    def local_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's share of the module's state dict, under the module's keys: the tensors it
        contributes to a gathered one (its stages', on the first replica), for sharded checkpoints."""
        tensors = local_tensors(self.captured.tensors, sorted(self.ownership.owned))
        aliases = self.captured.aliases
        return {key: tensors[aliases[key]] for key in self.captured.state_dict_keys if aliases[key] in tensors}

    def full_optimizer_state(self, optimizer: Optimizer, index: int, dst: int) -> dict[str, Any]:
        names = self._optimizer_state_names()
        return gather_optimizer_state(optimizer, self.ownership.layouts[index], names, dst, self.groups.cpu_group)

    def local_optimizer_state(self, optimizer: Optimizer, index: int) -> dict[str, Any]:
        return local_optimizer_state(optimizer, self.ownership.layouts[index], self._optimizer_state_names())

    def _optimizer_state_names(self) -> dict[int, str]:
        """The parameters whose optimizer state this rank contributes to a checkpoint: with
        ZeRO-0 every replica holds the same state, so only the first replica's counts."""
        if self.plan.zero_stage == 0 and self.groups.dp_rank != 0:
            return {}
        return self.optimizer_names


def warn_if_adjusted(batch_size: int, requested: int, used: int, minimum: int = 1) -> None:
    """Warn that a batch runs as ``used`` micro-batches, not the ``requested`` ones, saying why:
    fewer than the schedule's ``minimum``, or a count the batch does not divide."""
    if used == requested:
        return
    if requested < minimum:
        why = (
            f"the schedule needs at least {minimum} (1F1B-like schedules fill every pipeline stage). Ask for "
            f"{minimum} or more micro-batches, or use schedule='gpipe' and zero_bubble=False, to keep the count"
        )
    else:
        why = (
            f"micro-batches must all have one shape. Use a batch size that {requested} divides (and "
            "drop_last=True) to keep the planned count"
        )
    warnings.warn(
        f"RaNNCStrategy: a batch of {batch_size} sample(s) runs as {used} micro-batch(es) of "
        f"{batch_size // used}, not {requested}: {why}.",
        stacklevel=4,
    )


def _first_holders(plan: PartitionPlan) -> dict[str, int]:
    """Pipeline position of the first stage holding each tensor (counts it once in norms)."""
    first: dict[str, int] = {}
    for stage in plan.stages:
        for name in stage.tensor_names:
            first.setdefault(name, plan.position_of(stage.stage_index))
    return first


def _without_tensors(captured: CapturedStep) -> CapturedStep:
    """A capture kept only to replay its step's side effects: its (fake) tensors dropped."""
    captured.forget_tensors_except(set())
    return captured
