"""Glue from a LightningModule to a running pipeline: capture -> profile -> plan -> runtime.

The strategy owns one ``PipelineEngine``, made at ``setup``. Its pipeline is built lazily at
the first training batch (capture needs a real batch, as RaNNC partitions at the first
forward): every rank captures the step, rank 0 profiles and plans, every rank gets the plan (or
rank 0's error), the tied-weight process groups are created, and each rank builds only its own
stages and frees the other stages' tensors. What exists from then on is a ``BuiltPipeline``.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from lightning_rannc._compat import is_fake
from lightning_rannc._utils import where_defined
from lightning_rannc.capture.batch import FlatBatch
from lightning_rannc.capture.export import CapturedStep
from lightning_rannc.capture.graph import StepGraph
from lightning_rannc.capture.module_state import has_meta_tensors, module_tensors
from lightning_rannc.capture.reductions import SUM
from lightning_rannc.errors import RuntimeSetupError
from lightning_rannc.plan.memory import shard_over_replicas
from lightning_rannc.plan.plan import PartitionPlan
from lightning_rannc.plan.report import plan_lines
from lightning_rannc.profile.cache import ProfileCache
from lightning_rannc.runtime.agreement import decided_on_rank_zero
from lightning_rannc.runtime.built import BuiltPipeline, Ownership, warn_if_adjusted
from lightning_rannc.runtime.captures import ResizedSample, capture_micro, fake_capture, timing_samples
from lightning_rannc.runtime.initialize import initialize_tensors
from lightning_rannc.runtime.mesh import ProcessGroups, add_tied_groups
from lightning_rannc.runtime.planning import (
    EngineOptions,
    Layout,
    PlanRequest,
    deployed_or_new_plan,
    reference_microbatches,
)
from lightning_rannc.runtime.state import install_tensors
from lightning_rannc.runtime.trace import EventTrace
from lightning_rannc.runtime.verify import Reference, reference_step
from lightning_rannc.runtime.weights import apply_pending_loads, has_pending_loads

__all__ = ["PipelineEngine"]

_PARTITIONED = "_rannc_partitioned"
"""Set on a module created on the meta device once a plan has materialised its stages."""

log = logging.getLogger("lightning_rannc")


class PipelineEngine:
    """One rank's view of the pipelined training step of ``module``, before and after its build."""

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
        self.module, self.options = module, options
        self.rank, self.device, self.groups = rank, device, groups
        self.where = where_defined(type(module).training_step)  # type: ignore[attr-defined]
        self.cache = cache if cache is not None else ProfileCache()
        self.trace = trace
        self.pipeline: BuiltPipeline | None = None
        """The built pipeline, from the first training batch on."""
        self._from_meta: bool | None = None
        self.pending_optimizer_states: list[dict[str, Any]] | None = None
        """A checkpoint's full optimizer states, for a module created on the meta device until it is built."""
        self._metric_groups: dict[nn.Module, Any] = {}
        self._sync_metrics_over_replicas()

    @property
    def from_meta(self) -> bool:
        """Whether the module was created on the meta device (then it is never gathered whole).
        After the build other stages' tensors are meta on every rank: the answer is kept."""
        if self._from_meta is None:
            return has_meta_tensors(self.module)
        return self._from_meta

    def serves(self, module: Any, layout: Layout) -> bool:
        """Whether the built pipeline can evaluate ``module`` with ``layout`` (after ``fit``)."""
        if self.pipeline is None or module is not self.module:
            return False  # another module (e.g. the best checkpoint loaded): it is whole on every rank
        plan = self.pipeline.plan
        return (plan.pipeline_stages, plan.num_replicas) == (layout.pipeline_stages, layout.num_replicas)

    def rebind(self, groups: ProcessGroups) -> None:
        """Use new process groups (teardown destroyed the last ones), with the same plan."""
        self.groups = groups
        if self.pipeline is not None:
            self.pipeline.rebind(groups)
        self._sync_metrics_over_replicas()

    # --- the build, at the first batch ------------------------------------------------------------

    def build(
        self,
        batch: FlatBatch,
        optimizers: list[Optimizer],
        batch_idx: int = 0,
        loss_scale: float | torch.Tensor = 1.0,
        fit: bool = True,
    ) -> BuiltPipeline:
        """Capture, plan and build this rank's stages from the first batch (number ``batch_idx``,
        under 16-bit ``loss_scale``); keep in ``optimizers`` only what this rank updates. ``fit``:
        for training (else for ``validate``/``test``/``predict`` on a Trainer that did not fit,
        after which a ``fit`` plans again and reads the pretrained weights again). Collective."""
        requested = self.options.num_microbatches
        minimum = self.options.min_microbatches
        num_microbatches = reference_microbatches(batch.size, requested, minimum)
        if requested is not None:
            warn_if_adjusted(batch.size, requested, num_microbatches, minimum)
        on_meta = self._from_meta = self.from_meta
        if on_meta:
            captured, graph, plan, seed = self._plan_on_meta(batch, num_microbatches, batch_idx)
        else:
            captured, graph = capture_micro(self.module, batch, num_microbatches, batch_idx)
            micro = batch.size // num_microbatches
            samples = timing_samples(self.module, batch, micro, self.options)
            request = self._request(graph, batch, batch.first_leaves(micro), num_microbatches, False, samples)
            plan, seed = self._agreed_plan(request, graph)
        trainable = {n for n, t in captured.tensors.items() if isinstance(t, nn.Parameter) and t.requires_grad}
        add_tied_groups(self.groups, plan, self.rank, trainable, self.device)
        ownership = self._ownership(plan, captured, trainable)
        if on_meta:
            self._materialize_own_tensors(captured, graph, ownership, seed, keep_sources=not fit)
        pipeline = BuiltPipeline(
            module=self.module,
            plan=plan,
            captured=captured,
            graph=graph,
            ownership=ownership,
            rank=self.rank,
            device=self.device,
            groups=self.groups,
            seed=seed,
            where=self.where,
            verify_tolerance=self.options.config.verify_tolerance,
            trace=self.trace,
        )
        if plan.num_microbatches != num_microbatches:  # the search chose another count than costed
            captured_again, graph = pipeline.capture_again(batch, plan.num_microbatches, batch_idx)
            captured.guards = captured_again.guards
        runtime = pipeline.add_runtime(batch.shape_key, graph, plan.num_microbatches, captured).entry
        if self.options.config.verify:
            names = ownership.local & trainable
            sum_loss = captured.output_reductions.get(0) == SUM
            scale = float(loss_scale)  # read once, at the first step
            reference = self._reference_step(graph, batch, runtime.plan, names, seed, sum_loss, scale)
            pipeline.reference = reference
        # Drop every reference to other stages' tensors, or freeing them would free nothing.
        captured.forget_tensors_except(ownership.held)
        # ZeRO-3: another replica holds these; stages built later take their shape from here.
        placeholders = {n: _meta_like(graph.tensors[n]) for n in sorted(ownership.elsewhere)}
        captured.tensors.update(placeholders)
        ownership.names.update({id(t): n for n, t in placeholders.items()})
        _log_plan(plan, self.rank)
        self.pipeline = pipeline
        pipeline.restrict_optimizers(optimizers)
        if self.pending_optimizer_states is not None:
            pipeline.load_optimizer_states(optimizers, self.pending_optimizer_states)
            self.pending_optimizer_states = None
        return pipeline

    def _request(
        self,
        graph: StepGraph,
        batch: FlatBatch,
        micro: list[torch.Tensor],
        num_microbatches: int,
        analytic: bool,
        samples: list[ResizedSample],
    ) -> PlanRequest:
        return PlanRequest(graph, micro, num_microbatches, analytic, samples, self.where, self.module, batch)

    def _agreed_plan(self, request: PlanRequest, graph: StepGraph) -> tuple[PartitionPlan, int]:
        """Rank 0's plan (or its error) on every rank, and the seed of the stages' random streams
        and of meta-device initialisation: drawn from the seeded training RNG without advancing
        it, so that the same seed gives the same run."""
        with torch.random.fork_rng(devices=[]):
            seed = int(torch.empty((), dtype=torch.int64, device="cpu").random_(2**62))
        plan, seed = decided_on_rank_zero(
            lambda: (deployed_or_new_plan(request, self.options, self.cache), seed), self.rank, self.groups.cpu_group
        )
        if plan.graph_fingerprint != graph.fingerprint():
            raise RuntimeSetupError(
                f"Rank {self.rank} captured a different graph of `training_step` ({self.where}) than rank 0 "
                "from its first batch. Every rank must trace the same step (no rank-dependent branches, "
                "and the same batch shapes on every rank at the first step)."
            )
        return plan, seed

    def _plan_on_meta(
        self, batch: FlatBatch, num_microbatches: int, batch_idx: int
    ) -> tuple[CapturedStep, StepGraph, PartitionPlan, int]:
        """Capture and plan a module whose tensors are on the meta device, from fake tensors and
        analytic costs (nothing can run), then point the graph at the module's own tensors."""
        capture = fake_capture(self.module, batch, num_microbatches, self.device, batch_idx=batch_idx)
        with capture as (captured, graph, micro):
            plan, seed = self._agreed_plan(self._request(graph, batch, micro, num_microbatches, True, []), graph)
        captured.tensors = graph.tensors = {**module_tensors(self.module), **self._constants(captured)}
        return captured, graph, plan, seed

    def _constants(self, captured: CapturedStep) -> dict[str, torch.Tensor]:
        """The tensors the step creates from values known when it runs (``torch.tensor(0)``,
        empty masks: transformers makes several), which export lifts out of the graph. They are
        real even in a capture on fake tensors; only a tensor kept outside the module's
        parameters and buffers (a plain attribute) has no value on the meta device."""
        own = set(module_tensors(self.module))
        constants = {n: t for n, t in captured.tensors.items() if n not in own}
        unknown = sorted(n for n, t in constants.items() if t.is_meta or is_fake(t))
        if unknown:
            raise RuntimeSetupError(
                f"`training_step` ({self.where}) uses tensors that are neither parameters nor buffers of the module "
                f"and were created on the meta device with it ({unknown}): they have no values. Register them as "
                "buffers (`self.register_buffer(name, tensor, persistent=False)`) so that they are initialised."
            )
        return constants

    def _ownership(self, plan: PartitionPlan, captured: CapturedStep, trainable: set[str]) -> Ownership:
        local = {n for s in plan.stages_of_rank(self.rank) for n in s.tensor_names}
        sizes = {n: captured.tensors[n].numel() for n in sorted(local & trainable)}
        # ZeRO-0: every replica updates all of its stages' parameters, as DDP (nothing to share).
        sharded = plan.zero_stage in (1, 2, 3)
        optimizer_owner = shard_over_replicas(sizes, plan.num_replicas) if sharded else {}
        holders = self._zero3_holders(plan, optimizer_owner, sizes)
        own = self.groups.dp_rank
        # Into a gathered state dict: its stages' tensors from the first replica (ZeRO-3's from
        # their holder); tensors no stage uses stay on rank 0.
        canonical = set(captured.aliases.values())
        owned = canonical & (local - set(holders)) if own == 0 else set()
        owned |= {n for n, replica in holders.items() if replica == own}
        if self.rank == 0:
            owned |= canonical - {n for s in plan.stages for n in s.tensor_names}
        return Ownership(
            local=local,
            owned=owned,
            optimizer_owner=optimizer_owner,
            names={id(t): n for n, t in captured.tensors.items()},
            holders=holders,
            elsewhere={n for n, replica in holders.items() if replica != own},
        )

    def _zero3_holders(
        self, plan: PartitionPlan, optimizer_owner: dict[str, int], sizes: dict[str, int]
    ) -> dict[str, int]:
        """ZeRO-3: each parameter is held by the replica that updates it. Not those tied across
        stages (their copies are summed over stages first, ``runtime/zero3.py``), nor empty ones."""
        if plan.zero_stage != 3 or plan.num_replicas == 1:
            return {}
        tied = {n for _, names in self.groups.tied for n in names}
        return {n: r for n, r in optimizer_owner.items() if n not in tied and sizes[n] > 0}

    def _materialize_own_tensors(
        self, captured: CapturedStep, graph: StepGraph, ownership: Ownership, seed: int, keep_sources: bool
    ) -> None:
        """Allocate and initialise only the tensors of this rank's stages (RaNNC's
        DistributeModelParams), then load what ``load_pretrained`` or a checkpoint noted for them.
        With ZeRO-3 the whole stage is initialised (a module draws its tensors' values from one
        stream, in order: a tensor left meta would shift the next one's), but only what this
        replica holds is loaded (unless the first step is verified unpartitioned); the rest is
        released with the other stages' tensors."""
        tensors, own = captured.tensors, module_tensors(self.module)
        self._check_not_partitioned_before(own)
        names = sorted(n for n in ownership.local | ownership.owned if n in own)
        empty = {n: torch.empty(tensors[n].shape, dtype=tensors[n].dtype, device=self.device) for n in names}
        install_tensors(self.module, captured.aliases, empty, self.device)
        initialize_tensors(self.module, captured.aliases, names, seed, self.device)
        materialised = module_tensors(self.module)
        loaded = names if self.options.config.verify else [n for n in names if n in ownership.held]
        apply_pending_loads(self.module, captured.aliases, {n: materialised[n] for n in loaded}, keep=keep_sources)
        setattr(self.module, _PARTITIONED, True)
        constants = {n: t for n, t in tensors.items() if n not in own}
        captured.tensors = graph.tensors = {**module_tensors(self.module), **constants}
        # The optimizers still hold the meta parameters: both objects map to the name.
        ownership.names.update({id(t): n for n, t in captured.tensors.items()})

    def _check_not_partitioned_before(self, own: dict[str, torch.Tensor]) -> None:
        """A module an earlier run partitioned holds its trained tensors on other ranks: a new
        plan would start the tensors it moves afresh. A checkpoint (or pretrained weights)
        gives every rank its tensors again."""
        if getattr(self.module, _PARTITIONED, False) and not has_pending_loads(self.module):
            raise RuntimeSetupError(
                f"{type(self.module).__name__} was created on the meta device and is partitioned by an earlier `fit` "
                "(each rank holds only its stages' tensors): a new `fit`, or a Trainer that did not fit it, plans it "
                "again and cannot move the trained tensors between ranks. Save a checkpoint after the first run "
                "(`trainer.save_checkpoint`) and pass it as `ckpt_path` to `fit`/`validate`/`test`/`predict`, or "
                "evaluate with the Trainer that ran `fit`."
            )

    def _reference_step(
        self,
        graph: StepGraph,
        batch: FlatBatch,
        plan: PartitionPlan,
        names: set[str],
        seed: int,
        sum_loss: bool,
        loss_scale: float,
    ) -> Reference:
        """The unpartitioned first step (``verify``), while this rank still holds every tensor."""
        if self._from_meta:
            raise RuntimeSetupError(
                f"{type(self.module).__name__} was created on the meta device: no rank holds the whole module "
                "to run the unpartitioned step that verify=True compares with. Verify a smaller configuration."
            )
        key = (seed, 1, self.groups.dp_rank)  # the first step's random streams
        no_grad = plan.no_grad_values
        return reference_step(graph, batch.leaves, plan.num_microbatches, names, key, no_grad, sum_loss, loss_scale)

    # --- torchmetrics objects ---------------------------------------------------------------------

    def _sync_metrics_over_replicas(self) -> None:
        """Every rank of a pipeline replays the same metric updates (its replica's batch): an
        epoch's ``compute()`` gathers the states of the replicas only, one rank each (the ranks at
        this pipeline position), so each sample counts once, as with DDP."""
        from torchmetrics import Metric

        if not dist.is_initialized() or self.groups.dp_group is None:
            return
        for metric in self.module.modules():
            if isinstance(metric, Metric):
                self._metric_groups.setdefault(metric, metric.process_group)
                metric.process_group = self.groups.dp_group

    def restore_metric_groups(self) -> None:
        """Give the metrics back their own process groups (the mesh's are destroyed at teardown)."""
        for metric, group in self._metric_groups.items():
            metric.process_group = group
        self._metric_groups.clear()


def _log_plan(plan: PartitionPlan, rank: int) -> None:
    """Rank 0 logs the plan's headline, then the same table as ``python -m lightning_rannc show``."""
    if rank != 0:
        return
    width = shutil.get_terminal_size().columns
    for line in [plan.summary()[0], *plan_lines(plan, rich=_log_is_a_terminal(), width=width)[1:]]:
        log.info(line)


def _log_is_a_terminal() -> bool:
    """Whether every handler of this package's log writes to a terminal (not a file or pipe)."""
    handlers = [*log.handlers, *(logging.getLogger().handlers if log.propagate else [])]

    def to_terminal(handler: logging.Handler) -> bool:
        stream = getattr(handler, "stream", None)
        is_file = isinstance(handler, logging.FileHandler)
        return not is_file and stream is not None and hasattr(stream, "isatty") and stream.isatty()

    return bool(handlers) and all(to_terminal(h) for h in handlers)


def _meta_like(tensor: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(tensor, device="meta")
    return nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
