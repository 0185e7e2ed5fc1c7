"""Glue from a LightningModule to a running pipeline: capture -> profile -> plan -> runtime.

The strategy owns one ``PipelineEngine``. It is built lazily at the first training batch
(capture needs a real batch, as RaNNC partitions at the first forward): every rank captures
the step, rank 0 profiles and plans, the plan is broadcast (or rank 0's error, so that every
rank raises it), and each rank builds only its own stage and frees the other stages' tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer
from torch.utils._pytree import tree_unflatten

from lightning_rannc._utils import where_defined
from lightning_rannc.capture.export import CapturedStep, capture_training_step, flatten_batch
from lightning_rannc.capture.graph import StepGraph, group_nodes
from lightning_rannc.errors import PlanError, RuntimeSetupError
from lightning_rannc.plan.plan import PartitionPlan
from lightning_rannc.plan.planner import plan_pipeline
from lightning_rannc.profile.profiler import find_no_grad_values, profile_blocks
from lightning_rannc.runtime.optim import gather_optimizer_state, keep_local_params
from lightning_rannc.runtime.pipeline import PipelineRuntime
from lightning_rannc.runtime.state import gather_tensors, install_tensors, local_tensors, release_tensors

__all__ = ["EngineOptions", "PipelineEngine"]

log = logging.getLogger("lightning_rannc")


@dataclass(kw_only=True, frozen=True)
class EngineOptions:
    num_stages: int
    num_microbatches: int
    max_blocks: int = 64
    profile_repeats: int = 3


class PipelineEngine:
    """One rank's view of the pipelined training step of ``module``."""

    def __init__(self, module: nn.Module, options: EngineOptions, rank: int, device: torch.device) -> None:
        self.module = module
        self.options = options
        self.rank = rank
        self.device = device
        self.where = where_defined(type(module).training_step)  # type: ignore[attr-defined]
        self.plan: PartitionPlan | None = None
        self._captured: CapturedStep | None = None
        self._runtime: PipelineRuntime | None = None
        self._leaf_shapes: list[torch.Size] = []
        self._owned: set[str] = set()
        self._names: dict[int, str] = {}
        self._layouts: dict[int, list[list[str]]] = {}

    @property
    def built(self) -> bool:
        return self._runtime is not None

    # --- building -------------------------------------------------------------------------

    def build(self, batch: Any) -> None:
        """Capture, plan and build this rank's stage from the first batch. Collective."""
        leaves, spec = flatten_batch(batch, self.where)
        microbatch_size = self._check_batch_size(leaves)
        micro_leaves = [leaf[:microbatch_size] for leaf in leaves]
        self._captured = capture_training_step(self.module, tree_unflatten(micro_leaves, spec))
        graph = StepGraph.from_captured(self._captured)
        self.plan = self._agree_on_plan(graph, micro_leaves)
        self._leaf_shapes = [leaf.shape for leaf in leaves]
        self._runtime = PipelineRuntime(graph, self.plan, self.rank, self.device)
        self._owned = self._owned_names()
        self._names = {id(t): n for n, t in self._captured.tensors.items()}
        # Drop every reference to other stages' tensors, or freeing them would free nothing.
        self._captured.forget_tensors_except(self._owned)
        if self.rank == 0:
            for line in self.plan.summary():
                log.info(line)

    def _check_batch_size(self, leaves: list[torch.Tensor]) -> int:
        sizes = {int(leaf.shape[0]) if leaf.dim() else -1 for leaf in leaves}
        if len(sizes) != 1 or -1 in sizes:
            raise RuntimeSetupError(
                f"Every tensor in the batch given to `training_step` ({self.where}) must have the batch "
                f"size as its first dimension; got first dimensions {sorted(sizes)}."
            )
        batch_size, num_mb = sizes.pop(), self.options.num_microbatches
        if batch_size < num_mb or batch_size % num_mb:
            raise RuntimeSetupError(
                f"The batch size ({batch_size}) must be a multiple of `micro_batches` ({num_mb}) of "
                f"RaNNCStrategy: change the DataLoader's batch_size or the strategy's micro_batches."
            )
        return batch_size // num_mb

    def _agree_on_plan(self, graph: StepGraph, micro_leaves: list[torch.Tensor]) -> PartitionPlan:
        payload: list[Any] = [None]
        if self.rank == 0:
            try:
                payload[0] = self._make_plan(graph, micro_leaves)
            except Exception as err:  # every rank must learn of the failure, not wait for a plan
                payload[0] = err
        if dist.is_initialized():
            dist.broadcast_object_list(payload, src=0)
        if isinstance(payload[0], Exception):
            raise payload[0]
        plan: PartitionPlan = payload[0]
        if plan.graph_fingerprint != graph.fingerprint():
            raise RuntimeSetupError(
                f"Rank {self.rank} captured a different graph of `training_step` ({self.where}) than rank 0. "
                "The step must trace the same way on every rank (no rank-dependent code in training_step)."
            )
        return plan

    def _make_plan(self, graph: StepGraph, micro_leaves: list[torch.Tensor]) -> PartitionPlan:
        spans = group_nodes(graph, self.options.max_blocks)
        if len(spans) < self.options.num_stages:
            raise PlanError(
                f"The training step of {type(self.module).__name__} ({self.where}) splits into only "
                f"{len(spans)} block(s), fewer than the {self.options.num_stages} pipeline stages asked for: "
                "use fewer devices or pipeline_stages, or raise max_blocks."
            )
        costs = profile_blocks(graph, micro_leaves, spans, self.options.profile_repeats)
        tensors = graph.tensors
        plan = plan_pipeline(
            costs,
            num_stages=self.options.num_stages,
            num_microbatches=self.options.num_microbatches,
            microbatch_size=int(micro_leaves[0].shape[0]),
            graph_fingerprint=graph.fingerprint(),
            tensor_bytes={n: t.numel() * t.element_size() for n, t in tensors.items()},
            tensor_numel={n: t.numel() for n, t in tensors.items()},
        )
        plan.no_grad_values = find_no_grad_values(graph, micro_leaves, [s.node_start for s in plan.stages[1:]])
        return plan

    def _owned_names(self) -> set[str]:
        """Canonical names of the module's state this rank keeps; unused tensors stay on rank 0."""
        assert self._captured is not None and self.plan is not None
        canonical = set(self._captured.aliases.values())
        owned = canonical & set(self.plan.stage_of_rank(self.rank).tensor_names)
        if self.rank == 0:
            used = {n for s in self.plan.stages for n in s.tensor_names}
            owned |= canonical - used
        return owned

    def restrict_optimizers(self, optimizers: list[Optimizer]) -> None:
        """Keep only this rank's parameters in the user's optimizers, then free the others' memory."""
        assert self._captured is not None
        for index, optimizer in enumerate(optimizers):
            self._layouts[index] = keep_local_params(optimizer, self._names, self._owned)
        self._names = {i: n for i, n in self._names.items() if n in self._owned}
        self.release()

    def release(self) -> None:
        assert self._captured is not None
        release_tensors(self.module, self._captured.aliases, self._owned)

    # --- stepping -------------------------------------------------------------------------

    def check_batch(self, batch: Any, batch_idx: int) -> list[torch.Tensor]:
        leaves, _ = flatten_batch(batch, self.where)
        shapes = [leaf.shape for leaf in leaves]
        if shapes != self._leaf_shapes:
            raise RuntimeSetupError(
                f"Batch {batch_idx} has tensor shapes {[tuple(s) for s in shapes]}, but the pipeline was "
                f"built for {[tuple(s) for s in self._leaf_shapes]}. RaNNCStrategy needs a fixed batch "
                "shape so far: use `drop_last=True` in the DataLoader and pad to a fixed sequence length."
            )
        return leaves

    def run(self, leaves: list[torch.Tensor]) -> torch.Tensor:
        assert self._runtime is not None
        return self._runtime.run(leaves)

    def replay_logs(self, values: torch.Tensor) -> None:
        """Call the user's ``self.log`` with each logged value, now equal on every rank."""
        assert self._captured is not None
        for item in self._captured.logged:
            value: Any = item.constant if item.output_index is None else values[item.output_index].float()
            self.module.log(item.name, value, **item.kwargs)  # type: ignore[operator]

    def step_output(self, values: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        assert self._captured is not None
        loss = values[0].float()
        if not self._captured.returns_dict:
            return loss
        first_extra = 1 + sum(item.output_index is not None for item in self._captured.logged)
        extras = {k: values[first_extra + i].float() for i, k in enumerate(self._captured.extra_keys)}
        return {"loss": loss, **extras}

    def accumulate_grads(self, scale: float) -> None:
        assert self._runtime is not None
        self._runtime.accumulate_grads(scale)

    # --- full state -----------------------------------------------------------------------

    def full_state_dict(self, dst: int | None) -> dict[str, torch.Tensor]:
        """The unpartitioned module's state dict on ``dst`` (``None``: every rank). Collective."""
        assert self._captured is not None
        values = gather_tensors(local_tensors(self._captured.tensors, sorted(self._owned)), dst)
        if dst is not None and self.rank != dst:
            return {}
        return {key: values[self._captured.aliases[key]] for key in self._captured.state_dict_keys}

    def full_optimizer_state(self, optimizer: Optimizer, index: int, dst: int) -> dict[str, Any]:
        return gather_optimizer_state(optimizer, self._layouts[index], self._names, dst)

    def materialize(self) -> None:
        """Give every rank the whole module again (for evaluation and after fit). Collective."""
        assert self._captured is not None
        values = gather_tensors(local_tensors(self._captured.tensors, sorted(self._owned)), None)
        install_tensors(self.module, self._captured.aliases, values, self.device)
