"""Glue from a LightningModule to a running pipeline: capture -> profile -> plan -> runtime.

The strategy owns one ``PipelineEngine``. It is built lazily at the first training batch
(capture needs a real batch, as RaNNC partitions at the first forward): every rank captures
the step, rank 0 profiles and plans, the plan is broadcast (or rank 0's error, so that every
rank raises it), the mesh's process groups are created, and each rank builds only its own
stages and frees the other stages' tensors.

A batch of another shape (a smaller last batch, another sequence length) is captured again
and gets its own stage objects for the same plan; nothing is re-planned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_rannc._utils import where_defined
from lightning_rannc.capture.export import (
    CONSTANT_PREFIX,
    CapturedStep,
    LoggedValue,
    MetricCall,
    flatten_batch,
    module_tensors,
)
from lightning_rannc.capture.graph import StepGraph, align_nodes, group_nodes
from lightning_rannc.errors import CaptureError, PlanError, RuntimeSetupError
from lightning_rannc.plan.cost_model import BlockCost
from lightning_rannc.plan.plan import PartitionPlan, StagePlan, choose_microbatches
from lightning_rannc.plan.report import plan_lines
from lightning_rannc.plan.search import search_plan
from lightning_rannc.profile.cache import ProfileCache
from lightning_rannc.profile.profiler import find_no_grad_values
from lightning_rannc.profile.tensors import tensor_table
from lightning_rannc.runtime.mesh import ProcessGroups, add_tied_groups
from lightning_rannc.runtime.optim import (
    broadcast_from_owners,
    clip_grad_norm,
    gather_optimizer_state,
    keep_local_params,
    local_optimizer_state,
    shard_over_replicas,
)
from lightning_rannc.runtime.pipeline import PipelineRuntime
from lightning_rannc.runtime.planning import (
    EngineOptions,
    Layout,
    SmallerSample,
    batch_size_of,
    block_costs,
    capture_micro,
    fake_capture,
    reference_microbatches,
    search_settings,
    smaller_sample,
)
from lightning_rannc.runtime.state import (
    gather_tensors,
    initialize_tensors,
    install_tensors,
    local_tensors,
    release_tensors,
)
from lightning_rannc.runtime.trace import EventTrace
from lightning_rannc.runtime.verify import Reference, check_against_reference, reference_step

__all__ = ["EngineOptions", "PipelineEngine", "NotPipelined"]


@dataclasses.dataclass(frozen=True)
class NotPipelined:
    """What ``PipelineEngine.evaluate`` returns for a step that cannot run through the plan."""

    reason: str


log = logging.getLogger("lightning_rannc")

ShapeKey = tuple[tuple[int, ...], ...]


class PipelineEngine:
    """One rank's view of the pipelined training step of ``module``."""

    def __init__(
        self,
        module: nn.Module,
        options: EngineOptions,
        rank: int,
        device: torch.device,
        groups: ProcessGroups,
        cache: ProfileCache | None = None,
        trace: EventTrace | None = None,
    ) -> None:
        self.module = module
        self.options = options
        self.rank = rank
        self.device = device
        self.where = where_defined(type(module).training_step)  # type: ignore[attr-defined]
        self.plan: PartitionPlan | None = None
        self._captured: CapturedStep | None = None
        self._groups = groups
        self._runtimes: dict[ShapeKey, PipelineRuntime] = {}
        self._last_runtime: PipelineRuntime | None = None
        self._local: set[str] = set()
        self._owned: set[str] = set()
        self._names: dict[int, str] = {}
        self._layouts: dict[int, list[list[str]]] = {}
        self._optimizer_owner: dict[str, int] = {}
        self._updated_elsewhere: list[str] = []
        self._node_keys: list[tuple[str, str]] = []
        self._seed = 0
        self._steps = 0
        self._from_meta: bool | None = None
        self._node_names: list[str] = []
        self._cache = cache if cache is not None else ProfileCache()
        self._reference: Reference | None = None
        self._trace = trace
        self._eval_runtimes: dict[tuple[Any, ...], tuple[CapturedStep, PipelineRuntime] | NotPipelined] = {}
        self._eval_where: dict[str, str] = {}
        self._metric_groups: dict[nn.Module, Any] = {}
        self._eval_steps = 0
        self._sync_metrics_over_replicas()

    @property
    def built(self) -> bool:
        return self.plan is not None

    @property
    def from_meta(self) -> bool:
        """Whether the module was created on the meta device (then it is never gathered whole).
        After the build other stages' tensors are meta on every rank: the answer is kept."""
        if self._from_meta is None:
            return any(t.is_meta for t in module_tensors(self.module).values())
        return self._from_meta

    # --- building -------------------------------------------------------------------------

    def build(self, batch: Any) -> None:
        """Capture, plan and build this rank's stages from the first batch. Collective."""
        leaves, _ = flatten_batch(batch, self.where)
        batch_size = batch_size_of(leaves, self.where)
        num_microbatches = reference_microbatches(batch_size, self.options.num_microbatches, self._min_microbatches())
        if self.options.num_microbatches is not None:
            _warn_if_adjusted(batch_size, self.options.num_microbatches, num_microbatches)
        on_meta = self._from_meta = self.from_meta
        if on_meta:
            captured, graph, plan = self._plan_on_meta(batch, num_microbatches)
        else:
            captured, graph = capture_micro(self.module, batch, num_microbatches, self.where)
            micro_leaves = [leaf[: batch_size // num_microbatches] for leaf in leaves]
            smaller = smaller_sample(self.module, batch, self.where, batch_size // num_microbatches, self.options)
            plan = self._share_plan(self._propose_plan(graph, micro_leaves, num_microbatches, smaller=smaller), graph)
        self.plan, self._captured = plan, captured
        self._node_keys, self._node_names = graph.node_keys(), [n.name for n in graph.nodes]
        trainable = {n for n, t in captured.tensors.items() if isinstance(t, nn.Parameter) and t.requires_grad}
        add_tied_groups(self._groups, plan, self.rank, trainable)
        self._local = {n for s in plan.stages_of_rank(self.rank) for n in s.tensor_names}
        self._owned = self._state_owned_names()
        self._names = {id(t): n for n, t in captured.tensors.items()}
        if on_meta:
            self._materialize_own_tensors(graph)
        sizes = {n: captured.tensors[n].numel() for n in sorted(self._local & trainable)}
        self._optimizer_owner = shard_over_replicas(sizes, plan.num_replicas)
        if plan.num_microbatches != num_microbatches:  # the search chose another count than costed
            graph = self._capture_again(batch, plan.num_microbatches)
        runtime = self._add_runtime(_shape_key(leaves), graph, plan.num_microbatches)
        if self.options.verify:
            self._reference = self._reference_step(graph, leaves, runtime, trainable)
        # Drop every reference to other stages' tensors, or freeing them would free nothing.
        captured.forget_tensors_except(self._local | self._owned)
        if self.rank == 0:  # the plan's headline, then the same table as `python -m lightning_rannc show`
            width = shutil.get_terminal_size().columns
            for line in [plan.summary()[0], *plan_lines(plan, rich=_log_is_a_terminal(), width=width)[1:]]:
                log.info(line)

    def _reference_step(
        self, graph: StepGraph, leaves: list[torch.Tensor], runtime: PipelineRuntime, trainable: set[str]
    ) -> Reference:
        """The unpartitioned first step (``verify``), while this rank still holds every tensor."""
        if self._from_meta:
            raise RuntimeSetupError(
                f"{type(self.module).__name__} was created on the meta device: no rank holds the whole module "
                "to run the unpartitioned step that verify=True compares with. Verify a smaller configuration."
            )
        key = (self._seed, self._steps + 1, self._groups.dp_rank)
        no_grad = runtime.plan.no_grad_values
        names = self._local & trainable
        return reference_step(graph, leaves, runtime.plan.num_microbatches, names, key, no_grad)

    def _min_microbatches(self) -> int:
        options = self.options
        needs_fill = (
            options.schedule in ("1f1b", "interleaved_1f1b") or options.virtual_stages > 1 or options.zero_bubble
        )
        return self.options.pipeline_degree if needs_fill else 1

    def _capture_again(self, batch: Any, num_microbatches: int) -> StepGraph:
        """Capture the step for another batch shape; the graph uses this rank's real tensors."""
        assert self._captured is not None
        with fake_capture(self.module, batch, num_microbatches, self.where, self.device) as (_, graph, _):
            pass
        graph.tensors = self._captured.tensors  # this rank's parameters, buffers and constants
        return graph

    def _plan_on_meta(self, batch: Any, num_microbatches: int) -> tuple[CapturedStep, StepGraph, PartitionPlan]:
        """Capture and plan a module whose tensors are on the meta device, from fake tensors and
        analytic costs (nothing can run), then point the graph at the module's own tensors."""
        with fake_capture(self.module, batch, num_microbatches, self.where, self.device) as (captured, graph, micro):
            proposal = self._propose_plan(graph, micro, num_microbatches, analytic=True)
        plan = self._share_plan(proposal, graph)
        real = module_tensors(self.module)
        constants = sorted(set(captured.tensors) - set(real))
        if constants:
            raise RuntimeSetupError(
                f"`training_step` ({self.where}) uses tensors created outside the module ({constants}); a module "
                "created on the meta device cannot provide them. Register them as buffers."
            )
        captured.tensors = graph.tensors = real
        return captured, graph, plan

    def _materialize_own_tensors(self, graph: StepGraph) -> None:
        """Allocate and initialise only the tensors this rank holds (RaNNC's DistributeModelParams)."""
        assert self._captured is not None
        names = sorted(n for n in self._local | self._owned if n in self._captured.tensors)
        tensors = self._captured.tensors
        empty = {n: torch.empty(tensors[n].shape, dtype=tensors[n].dtype, device=self.device) for n in names}
        install_tensors(self.module, self._captured.aliases, empty, self.device)
        initialize_tensors(self.module, names, self._seed, self.device)
        self._captured.tensors = graph.tensors = module_tensors(self.module)
        self._names.update({id(t): n for n, t in self._captured.tensors.items()})

    def _propose_plan(
        self,
        graph: StepGraph,
        micro_leaves: list[torch.Tensor],
        num_microbatches: int,
        analytic: bool = False,
        smaller: SmallerSample | None = None,
    ) -> list[Any]:
        """Rank 0's plan (or its error) and seed; other ranks propose nothing."""
        # The seed of the stages' random streams and of meta-device initialisation: drawn from
        # the seeded training RNG (without advancing it), so the same seed gives the same run.
        with torch.random.fork_rng(devices=[]):
            payload: list[Any] = [None, int(torch.empty((), dtype=torch.int64, device="cpu").random_(2**62))]
        if self.rank == 0:
            try:
                payload[0] = self._deployed_or_new_plan(graph, micro_leaves, num_microbatches, analytic, smaller)
            except Exception as err:  # every rank must learn of the failure, not wait for a plan
                payload[0] = err
        return payload

    def _deployed_or_new_plan(
        self,
        graph: StepGraph,
        micro_leaves: list[torch.Tensor],
        num_microbatches: int,
        analytic: bool,
        smaller: SmallerSample | None = None,
    ) -> PartitionPlan:
        """RaNNC's save/load_deployment: reuse a saved plan when it fits this run, else plan."""
        path = self.options.deployment
        if path is None or not Path(path).exists():
            plan = self._make_plan(graph, micro_leaves, num_microbatches, analytic, smaller)
            if path is not None:
                plan.save(path)
                log.info("saved the plan as deployment %s", path)
            return plan
        plan = PartitionPlan.load(path)
        plan.check_matches(
            path,
            graph_fingerprint=graph.fingerprint(),
            world_size=self.options.pipeline_degree * self.options.num_replicas,
            num_replicas=self.options.num_replicas,
            virtual_stages=self.options.search_virtual_stages,
            replica_batch_size=int(micro_leaves[0].shape[0]) * num_microbatches,
            zero_bubble=self.options.zero_bubble,
            **({} if self.options.num_microbatches is None else {"num_microbatches": num_microbatches}),
        )
        log.info("loaded deployment %s: no profiling, no search", path)
        return plan

    def _share_plan(self, payload: list[Any], graph: StepGraph) -> PartitionPlan:
        if dist.is_initialized():
            dist.broadcast_object_list(payload, src=0)
        if isinstance(payload[0], Exception):
            raise payload[0]
        plan: PartitionPlan = payload[0]
        self._seed = payload[1]
        if plan.graph_fingerprint != graph.fingerprint():
            raise RuntimeSetupError(
                f"Rank {self.rank} captured a different graph of `training_step` ({self.where}) than rank 0 "
                "from its first batch. Every rank must trace the same step (no rank-dependent branches, "
                "and the same batch shapes on every rank at the first step)."
            )
        return plan

    def _plan_for(self, graph: StepGraph, num_microbatches: int) -> PartitionPlan:
        """The plan, with its node ranges moved onto another capture of the step (another shape)."""
        assert self.plan is not None and self._captured is not None
        plan = dataclasses.replace(self.plan, num_microbatches=num_microbatches)
        if graph.fingerprint() == plan.graph_fingerprint:
            return plan
        matched = align_nodes(self._node_keys, graph.node_keys())
        stages = _moved_stages(plan, matched, len(graph))
        names = {i: n.name for i, n in enumerate(graph.nodes)}
        no_grad = [
            names[matched[i]] for i, n in enumerate(self._node_names) if n in plan.no_grad_values and i in matched
        ]
        plan = dataclasses.replace(plan, stages=stages, no_grad_values=no_grad)  # names of the new graph
        for stage in plan.stages_of_rank(self.rank):
            missing = set(graph.tensor_names(stage.node_start, stage.node_end)) - set(self._captured.tensors)
            if stage.node_start >= stage.node_end or missing:
                raise RuntimeSetupError(
                    f"A batch of another shape changes the graph of `training_step` ({self.where}) so much "
                    f"that stage {stage.stage_index} no longer matches the plan (needs {sorted(missing)}). "
                    "Use fixed batch shapes (drop_last=True, padding to one length)."
                )
        return plan

    def _make_plan(
        self,
        graph: StepGraph,
        micro_leaves: list[torch.Tensor],
        num_microbatches: int,
        analytic: bool,
        smaller: SmallerSample | None = None,
    ) -> PartitionPlan:
        options = self.options
        num_stages = options.pipeline_degree * options.search_virtual_stages
        num_blocks = len(group_nodes(graph, options.max_blocks))
        if num_blocks < num_stages:
            raise PlanError(
                f"The training step of {type(self.module).__name__} ({self.where}) splits into only "
                f"{num_blocks} block(s), fewer than the {num_stages} pipeline stages asked for: "
                "use fewer pipeline stages, or raise max_blocks."
            )
        costs = block_costs(graph, micro_leaves, options, self._cache, analytic, smaller)
        plan = self._searched_plan(graph, costs, int(micro_leaves[0].shape[0]), num_microbatches)
        plan.no_grad_values = find_no_grad_values(graph, micro_leaves, [s.node_start for s in plan.stages[1:]])
        self._check_written_buffers(plan, graph)
        return plan

    def _searched_plan(
        self, graph: StepGraph, costs: list[BlockCost], microbatch_size: int, num_microbatches: int
    ) -> PartitionPlan:
        """The search with the layout fixed (the strategy chose it at setup, before the data
        loaders were sharded over the replicas). It picks the split under the memory limit,
        checkpointing where needed, the schedule and, unless it is given, the micro-batch count."""
        options = self.options
        settings = search_settings(
            options,
            num_devices=options.pipeline_degree * options.num_replicas,
            replica_batch_size=microbatch_size * num_microbatches,
            layout=Layout(options.pipeline_degree, options.num_replicas, ""),
        )
        if options.num_microbatches is not None:  # the count that divides this batch
            settings = dataclasses.replace(settings, micro_batches=num_microbatches)
        started = time.perf_counter()
        result = search_plan(
            costs,
            reference_microbatch_size=microbatch_size,
            settings=settings,
            tensors=tensor_table(graph.tensors),
            graph_fingerprint=graph.fingerprint(),
        )
        log.info("searched %d candidate plans in %.2f s", len(result.candidates), time.perf_counter() - started)
        return result.plan

    def _check_written_buffers(self, plan: PartitionPlan, graph: StepGraph) -> None:
        written = set(graph.written_buffers)
        for name in written:
            users = [s.stage_index for s in plan.stages if name in s.tensor_names]
            if len(users) > 1:
                raise PlanError(
                    f"The buffer `{name}` is updated in place by `training_step` ({self.where}) and used by "
                    f"stages {users}: its copies would diverge. Use fewer pipeline stages or a larger max_blocks."
                )

    def _state_owned_names(self) -> set[str]:
        """Tensors this rank contributes to a gathered state dict: its stages' on the first
        replica; tensors no stage uses stay on rank 0."""
        assert self._captured is not None and self.plan is not None
        canonical = set(self._captured.aliases.values())
        owned = canonical & self._local if self._groups.dp_rank == 0 else set()
        if self.rank == 0:
            owned |= canonical - {n for s in self.plan.stages for n in s.tensor_names}
        return owned

    def _add_runtime(self, key: ShapeKey, graph: StepGraph, num_microbatches: int) -> PipelineRuntime:
        assert self._captured is not None
        plan = self._plan_for(graph, num_microbatches)
        first_metric = self._captured.first_metric_output
        microbatch_size = int(graph.inputs[0].meta["val"].shape[0]) if graph.inputs else 1
        _check_combinable(graph.outputs[first_metric:], microbatch_size, f"`training_step` ({self.where})")
        runtime = PipelineRuntime(
            graph, plan, self.rank, self.device, self._groups, self._trace, num_scalar_outputs=first_metric
        )
        self._runtimes[key] = runtime
        return runtime

    def _runtime_for(self, batch: Any, leaves: list[torch.Tensor], batch_idx: int) -> PipelineRuntime:
        key = _shape_key(leaves)
        if key in self._runtimes:
            return self._runtimes[key]
        assert self.plan is not None
        batch_size = batch_size_of(leaves, self.where)
        num_microbatches = self.plan.microbatches_for(batch_size)
        _warn_if_adjusted(batch_size, self.plan.num_microbatches, num_microbatches)
        log.debug("batch %d has shapes %s: capturing the step for them", batch_idx, key)
        graph = self._capture_again(batch, num_microbatches)
        return self._add_runtime(key, graph, num_microbatches)

    def restrict_optimizers(self, optimizers: list[Optimizer]) -> None:
        """Keep in the user's optimizers only the parameters whose optimizer state this rank
        holds (its stages', sharded over replicas), then free other stages' memory."""
        assert self._captured is not None
        dp_rank = self._groups.dp_rank
        keep = {n for n in self._local if self._optimizer_owner.get(n, dp_rank) == dp_rank}
        self._updated_elsewhere = sorted(set(self._optimizer_owner) - keep)
        for index, optimizer in enumerate(optimizers):
            # Parameters materialised from the meta device are new objects: put them in the groups.
            for group in optimizer.param_groups:
                group["params"] = [self._captured.tensors.get(self._names[id(p)], p) for p in group["params"]]
            self._layouts[index] = keep_local_params(optimizer, self._names, keep)
        self._names = {i: n for i, n in self._names.items() if n in self._local | self._owned}
        self.release()

    def rebind(self, groups: ProcessGroups) -> None:
        """Use new process groups (a later ``validate``/``test``/``predict``): the stages made
        with the old ones are dropped and built again when needed."""
        assert self._captured is not None
        self._groups = groups
        self._runtimes.clear()
        self._eval_runtimes.clear()
        self._last_runtime = None
        # Moving the module between devices (teardown, setup) replaces buffer objects.
        current = module_tensors(self.module)
        self._captured.tensors = {n: current.get(n, t) for n, t in self._captured.tensors.items()}
        self._names = {id(t): n for n, t in self._captured.tensors.items()}
        self._sync_metrics_over_replicas()

    def _sync_metrics_over_replicas(self) -> None:
        """Every rank of a pipeline replays the same metric updates (its replica's batch): an
        epoch's ``compute()`` gathers the states of the replicas only, one rank each (the ranks at
        this pipeline position), so each sample counts once, as with DDP."""
        from torchmetrics import Metric

        if not dist.is_initialized() or self._groups.dp_group is None:
            return
        for metric in self.module.modules():
            if isinstance(metric, Metric):
                self._metric_groups.setdefault(metric, metric.process_group)
                metric.process_group = self._groups.dp_group

    def restore_metric_groups(self) -> None:
        """Give the metrics back their own process groups (the mesh's are destroyed at teardown)."""
        for metric, group in self._metric_groups.items():
            metric.process_group = group
        self._metric_groups.clear()

    def release(self) -> None:
        assert self._captured is not None
        release_tensors(self.module, self._captured.aliases, self._local | self._owned)

    # --- stepping -------------------------------------------------------------------------

    def run(self, batch: Any, batch_idx: int, loss_scale: float = 1.0) -> torch.Tensor:
        leaves, _ = flatten_batch(batch, self.where)
        runtime = self._runtime_for(batch, leaves, batch_idx)
        self._last_runtime = runtime
        self._steps += 1
        if self._trace is not None:
            self._trace.start_step()
        values = runtime.run(leaves, self._seed, self._steps, loss_scale)
        if self._reference is not None:
            grads = {self._names[id(p)]: g for p, g in runtime.pending_grads().items()}
            reference, self._reference = self._reference, None
            tolerance = self.options.verify_tolerance
            check_against_reference(reference, float(values[0]), grads, self._groups, tolerance, loss_scale)
        self._share_written_buffers()
        return values

    def _share_written_buffers(self) -> None:
        """Replicas see different data; like DDP, every replica takes replica 0's buffers."""
        assert self._captured is not None
        if self._groups.num_replicas == 1:
            return
        for name in sorted(set(self._captured.written_buffers) & self._local):
            dist.broadcast(self._captured.tensors[name], src=self._groups.replica_rank(0), group=self._groups.dp_group)

    def replay_logs(
        self,
        values: torch.Tensor | list[torch.Tensor],
        captured: CapturedStep | None = None,
        tensor_outputs: list[torch.Tensor] | None = None,
    ) -> None:
        """Replay the step's side effects in their order: each ``self.log`` call with its value,
        now equal on every rank (of the pipeline, for evaluation steps: replicas log their own
        shard's values, as with DDP), and each torchmetrics call with the whole batch's
        arguments (``tensor_outputs``: the graph outputs from ``first_metric_output`` on)."""
        captured = captured or self._captured
        assert captured is not None
        if tensor_outputs is None:
            tensor_outputs = self._last_runtime.tensor_outputs if self._last_runtime is not None else []
        results: list[Any] = []  # what each metric call returned, by call index
        events: list[LoggedValue | MetricCall] = sorted([*captured.logged, *captured.metric_calls], key=_order)
        for event in events:
            if isinstance(event, MetricCall):
                results.append(self._replay_metric_call(event, tensor_outputs, captured.first_metric_output))
            else:
                value = self._logged_value(event, values, results)
                self.module.log(event.name, value, **event.kwargs)  # type: ignore[operator]

    def _logged_value(self, item: LoggedValue, values: torch.Tensor | list[torch.Tensor], results: list[Any]) -> Any:
        if item.metric is not None:
            return self.module.get_submodule(item.metric)
        if item.metric_call is not None:
            index, key = item.metric_call
            return results[index] if key is None else results[index][key]
        return item.constant if item.output_index is None else values[item.output_index].float()

    def _replay_metric_call(self, call: MetricCall, tensor_outputs: list[torch.Tensor], first: int) -> Any:
        leaves = list(call.constants)
        start = call.first_output - first
        for offset, position in enumerate(call.tensor_positions):
            leaves[position] = tensor_outputs[start + offset]
        args, kwargs = tree_unflatten(leaves, call.arguments_spec)
        metric: Any = self.module.get_submodule(call.path)
        return metric(*args, **kwargs) if call.method == "forward" else metric.update(*args, **kwargs)

    def step_output(self, values: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        assert self._captured is not None
        loss = values[0].float()
        if not self._captured.returns_dict:
            return loss
        first_extra = 1 + sum(item.output_index is not None for item in self._captured.logged)
        extras = {k: values[first_extra + i].float() for i, k in enumerate(self._captured.extra_keys)}
        return {"loss": loss, **extras}

    def accumulate_grads(self, scale: float) -> None:
        assert self._last_runtime is not None
        self._last_runtime.accumulate_grads(scale)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip this rank's gradients by the norm over the whole model (all stages). Collective."""
        assert self.plan is not None and self._captured is not None
        first_holder = _first_holders(self.plan)
        params = {n: self._captured.tensors[n] for n in sorted(self._local) if n in self._captured.tensors}
        counted = [p for n, p in params.items() if first_holder.get(n) == self._groups.pp_rank]
        return clip_grad_norm(list(params.values()), counted, max_norm, self._groups.pp_group)

    def unscale_updated_elsewhere(self, inv_scale: float) -> None:
        """Unscale the gradients the optimizer does not hold (it unscales its own): they enter
        the gradient norm."""
        assert self._captured is not None
        for name in self._updated_elsewhere:
            grad = self._captured.tensors[name].grad
            if grad is not None:
                grad.mul_(inv_scale)

    def _span(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self._trace.span(name, "collective") if self._trace is not None else contextlib.nullcontext()

    def after_optimizer_step(self) -> None:
        """Share the parameters each replica updated with the others (sharded optimizer state)."""
        assert self._captured is not None
        if self._groups.num_replicas > 1:
            with self._span("updated parameters shared by replicas"):
                broadcast_from_owners(self._captured.tensors, self._optimizer_owner, self._groups)
        # Lightning's zero_grad only reaches parameters in the optimizer; the others' gradients
        # (kept for the gradient norm) must not leak into the next accumulation window.
        for name in self._updated_elsewhere:
            self._captured.tensors[name].grad = None

    # --- evaluation -----------------------------------------------------------------------

    def evaluate(self, step_name: str, batch: Any, batch_idx: int, extra_args: tuple[Any, ...] = ()) -> Any:
        """Run ``validation_step``, ``test_step`` or ``predict_step`` forward only through this
        rank's stages, with the parameters where training put them; replay its ``self.log`` and
        metric calls and return what it returned. ``NotPipelined`` (the same on every rank of the
        pipeline, which all see the same batch) when the step cannot run that way. Collective
        over the pipeline."""
        if step_name not in self._eval_where:
            self._eval_where[step_name] = where_defined(getattr(type(self.module), step_name))
        where = self._eval_where[step_name]
        try:
            leaves, spec = flatten_batch(batch, where, step_name)
        except CaptureError as error:  # no tensor in the batch
            return NotPipelined(str(error))
        # The non-tensor leaves' values are not graph inputs: only their places are in the key.
        key = (step_name, extra_args, spec.tree, spec.tensor_positions, _shape_key(leaves))
        if key not in self._eval_runtimes:
            log.debug("%s batch %d has shapes %s: capturing the step for them", step_name, batch_idx, key[-1])
            self._eval_runtimes[key] = self._add_eval_runtime(step_name, batch, extra_args, where)
        entry = self._eval_runtimes[key]
        if isinstance(entry, NotPipelined):
            return entry
        captured, runtime = entry
        values: list[torch.Tensor] = []
        if runtime.num_outputs:
            self._eval_steps += 1
            values = runtime.evaluate(leaves, self._seed, -self._eval_steps)
        self.replay_logs(values, captured, values[captured.first_metric_output :])
        returned = values[sum(item.output_index is not None for item in captured.logged) : captured.first_metric_output]
        leaves_out = list(captured.output_constants)
        for position, value in zip(captured.output_tensor_positions, returned, strict=True):
            leaves_out[position] = value
        batch_leaves = tree_flatten(batch)[0]
        for position, batch_position in captured.output_batch_leaves.items():
            leaves_out[position] = batch_leaves[batch_position]
        assert captured.output_spec is not None
        return tree_unflatten(leaves_out, captured.output_spec)

    def _add_eval_runtime(
        self, step_name: str, batch: Any, extra_args: tuple[Any, ...], where: str
    ) -> tuple[CapturedStep, PipelineRuntime] | NotPipelined:
        assert self.plan is not None and self._captured is not None
        named = f"`{step_name}` ({where})"
        try:
            leaves, _ = flatten_batch(batch, where, step_name)
            batch_size = batch_size_of(leaves, where)
            num_microbatches = choose_microbatches(batch_size, self.plan.num_microbatches)
            with fake_capture(self.module, batch, num_microbatches, where, self.device, step_name, extra_args) as (
                captured,
                graph,
                _,
            ):
                _check_combinable(graph.outputs, batch_size // num_microbatches, named)
        except (CaptureError, RuntimeSetupError) as error:
            log.debug("%s cannot be captured", named, exc_info=True)
            return NotPipelined(str(error))
        if captured.changed_attributes:
            return NotPipelined(
                f"{named} changes {', '.join(f'self.{a}' for a in captured.changed_attributes)}: it runs as a "
                "captured graph, whose Python side effects happen only once, at capture."
            )
        plan = self._eval_plan(graph, num_microbatches)
        if plan is None:
            return NotPipelined(
                f"{named} computes with the parameters in another order than `training_step`: a stage would need "
                "another stage's parameters."
            )
        constants = {n: t for n, t in captured.tensors.items() if n.startswith(CONSTANT_PREFIX)}
        graph.tensors = {**self._captured.tensors, **constants}  # this rank's real tensors, the step's constants
        runtime = PipelineRuntime(graph, plan, self.rank, self.device, self._groups, forward_only=True)
        captured.forget_tensors_except(set())
        return captured, runtime

    def _eval_plan(self, graph: StepGraph, num_microbatches: int) -> PartitionPlan | None:
        """The training plan's split moved onto an evaluation step's graph, matching nodes by
        op and module; ``None`` when a stage would need parameters its ranks do not hold."""
        assert self.plan is not None
        plan = self.plan
        stages = _moved_stages(plan, align_nodes(self._node_keys, graph.node_keys()), len(graph))
        for stage in stages:
            needed = {
                n for n in graph.tensor_names(stage.node_start, stage.node_end) if not n.startswith(CONSTANT_PREFIX)
            }
            if not needed <= set(stage.tensor_names):
                return None
        # No backward: nothing to recompute, and no 1F1B (the runtime runs a fill and drain).
        stages = [dataclasses.replace(s, checkpoint=False) for s in stages]
        return dataclasses.replace(plan, stages=stages, num_microbatches=num_microbatches, no_grad_values=[])

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

    def local_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's share of the module's state dict, under the module's keys: the tensors it
        contributes to a gathered one (its stages', on the first replica), for sharded checkpoints."""
        assert self._captured is not None
        tensors = local_tensors(self._captured.tensors, sorted(self._owned))
        aliases = self._captured.aliases
        return {key: tensors[aliases[key]] for key in self._captured.state_dict_keys if aliases[key] in tensors}

    def local_optimizer_state(self, optimizer: Optimizer, index: int) -> dict[str, Any]:
        return local_optimizer_state(optimizer, self._layouts[index], self._names)

    def materialize(self) -> None:
        """Give every rank the whole module again (for evaluation and after fit). Collective."""
        assert self._captured is not None
        values = gather_tensors(local_tensors(self._captured.tensors, sorted(self._owned)), None)
        install_tensors(self.module, self._captured.aliases, values, self.device)


def _log_is_a_terminal() -> bool:
    """Whether every handler of this package's log writes to a terminal (not a file or pipe)."""
    handlers = [*log.handlers, *(logging.getLogger().handlers if log.propagate else [])]

    def to_terminal(handler: logging.Handler) -> bool:
        stream = getattr(handler, "stream", None)
        is_file = isinstance(handler, logging.FileHandler)
        return not is_file and stream is not None and hasattr(stream, "isatty") and stream.isatty()

    return bool(handlers) and all(to_terminal(h) for h in handlers)


def _check_combinable(outputs: list[torch.fx.Node], microbatch_size: int, where: str) -> None:
    """Micro-batches' outputs are combined by averaging scalars and concatenating per-sample
    tensors; anything else cannot be rebuilt for the whole batch."""
    for value in outputs:
        example = value.meta.get("val")
        if not isinstance(example, torch.Tensor):
            raise RuntimeSetupError(f"{where} returns a {type(example).__name__}; RaNNCStrategy returns tensors only.")
        if example.dim() and example.shape[0] != microbatch_size:
            raise RuntimeSetupError(
                f"{where} returns (or passes to a torchmetrics object) a tensor of shape {tuple(example.shape)} "
                f"for a micro-batch of {microbatch_size} sample(s). RaNNCStrategy runs the step per micro-batch "
                "and can only average scalars and concatenate per-sample tensors (first dimension = batch): "
                "use one of those."
            )


def _order(event: LoggedValue | MetricCall) -> int:
    return event.order


def _warn_if_adjusted(batch_size: int, requested: int, used: int) -> None:
    if used != requested:
        warnings.warn(
            f"RaNNCStrategy: a batch of {batch_size} sample(s) runs as {used} micro-batch(es) of "
            f"{batch_size // used}, not {requested}: micro-batches must all have one shape. Use a batch size "
            f"that {requested} divides (and drop_last=True) to keep the planned count.",
            stacklevel=3,
        )


def _shape_key(leaves: list[torch.Tensor]) -> ShapeKey:
    return tuple(tuple(leaf.shape) for leaf in leaves)


def _moved_stages(plan: PartitionPlan, matched: dict[int, int], num_nodes: int) -> list[StagePlan]:
    """The plan's stages on another graph of ``num_nodes`` nodes: each starts at the first node
    matching one at or after its old start (the first stage at 0, whatever comes before)."""
    starts = [0] + [_next_matched(matched, s.node_start, num_nodes) for s in plan.stages[1:]] + [num_nodes]
    return [dataclasses.replace(s, node_start=a, node_end=b) for s, a, b in zip(plan.stages, starts, starts[1:])]


def _next_matched(matched: dict[int, int], index: int, default: int) -> int:
    """New index of the first node at or after ``index`` that both captures share."""
    later = [matched[i] for i in matched if i >= index]
    return min(later) if later else default


def _first_holders(plan: PartitionPlan) -> dict[str, int]:
    """Pipeline position of the first stage holding each tensor (counts it once in norms)."""
    first: dict[str, int] = {}
    for stage in plan.stages:
        for name in stage.tensor_names:
            first.setdefault(name, stage.stage_index % plan.pipeline_degree)
    return first
