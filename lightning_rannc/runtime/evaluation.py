"""``validation_step``, ``test_step`` and ``predict_step`` forward only through the training plan.

Each step is captured in eval mode, once per batch shape, and cut where training was cut, by
matching its nodes to the training graph's by op and module path. It runs with the schedule's
``eval()``; on the last stage scalar outputs are averaged over micro-batches and per-sample
tensors concatenated, then shared with the pipeline's ranks, its ``self.log`` and metric calls
are replayed, and the returned structure is rebuilt. A step that cannot run that way gets a
``NotPipelined`` with the reason, the same on every rank of the pipeline.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import torch

from lightning_rannc._compat import tree_flatten, tree_unflatten
from lightning_rannc._utils import where_defined
from lightning_rannc.capture.batch import FlatBatch
from lightning_rannc.capture.export import CONSTANT_PREFIX, CapturedStep
from lightning_rannc.capture.graph import StepGraph, align_nodes
from lightning_rannc.capture.guards import Source
from lightning_rannc.capture.watching import current_numbers
from lightning_rannc.errors import CaptureError, RuntimeSetupError
from lightning_rannc.plan.plan import PartitionPlan, StagePlan, choose_microbatches
from lightning_rannc.runtime.captures import fake_capture
from lightning_rannc.runtime.pipeline import PipelineRuntime
from lightning_rannc.runtime.replay import replay_logs
from lightning_rannc.runtime.variants import Variant, Variants, numbers_read

if TYPE_CHECKING:
    from lightning_rannc.runtime.built import BuiltPipeline

__all__ = ["NotPipelined", "PipelinedEvaluation", "check_combinable", "moved_stages"]

log = logging.getLogger("lightning_rannc")


@dataclasses.dataclass(frozen=True)
class NotPipelined:
    """What ``PipelinedEvaluation.run`` returns for a step that cannot run through the plan."""

    reason: str


class PipelinedEvaluation:
    """The evaluation steps of ``pipeline``'s module, each captured once per batch shape."""

    def __init__(self, pipeline: BuiltPipeline) -> None:
        self.pipeline = pipeline
        self.runtimes: dict[tuple[Any, ...], Variants[PipelineRuntime] | NotPipelined] = {}
        self._where: dict[str, str] = {}
        self._steps = 0
        self._numbers: dict[Source, Any] = {}

    @property
    def pipelined_steps(self) -> list[str]:
        """The steps that ran through the pipeline (for tests and diagnostics)."""
        return sorted({key[0] for key, entry in self.runtimes.items() if isinstance(entry, Variants)})

    def run(self, step_name: str, batch: Any, batch_idx: int, extra_args: tuple[Any, ...] = ()) -> Any:
        """Run ``step_name`` on ``batch`` through this rank's stages, with the parameters where
        training put them; replay its side effects and return what it returned. Collective over
        the pipeline."""
        module = self.pipeline.module
        if step_name not in self._where:
            self._where[step_name] = where_defined(getattr(type(module), step_name))
        try:
            flat = FlatBatch.of(batch, self._where[step_name], step_name)
        except CaptureError as error:  # no tensor in the batch
            return NotPipelined(str(error))
        # The non-tensor leaves' values are not graph inputs: only their places are in the key.
        key = (step_name, extra_args, flat.spec.tree, flat.spec.tensor_positions, flat.shape_key)
        variant = self._variant_for(key, flat, batch_idx)
        if isinstance(variant, NotPipelined):
            return variant
        captured, runtime = variant.captured, variant.entry
        values: list[torch.Tensor] = []
        if runtime.num_outputs:
            self._steps += 1
            values = runtime.evaluate(flat.leaves, self.pipeline.seed, -self._steps)
        replay_logs(module, captured, values, values[captured.first_metric_output :], self._numbers)
        return _returned(captured, values, batch)

    def _variant_for(
        self, key: tuple[Any, ...], batch: FlatBatch, batch_idx: int
    ) -> Variant[PipelineRuntime] | NotPipelined:
        """The stages for the step's batch shape and the path its numbers decide (captured now if
        new), or why the step cannot run through the pipeline."""
        step_name, extra_args = key[0], key[1]
        entry = self.runtimes.get(key)
        if isinstance(entry, NotPipelined):
            return entry
        module = self.pipeline.module
        captures = [v.captured for e in self.runtimes.values() if isinstance(e, Variants) for v in e.variants]
        self._numbers = current_numbers(module, batch_idx, numbers_read(captures))
        found = entry.find(self._numbers) if entry is not None else None
        if found is not None:
            return found
        log.debug("%s batch %d (shapes %s) takes a path not captured yet: capturing it", step_name, batch_idx, key[-1])
        added = self._add_runtime(step_name, batch, extra_args, batch_idx)
        if isinstance(added, NotPipelined):
            if entry is None:
                self.runtimes[key] = added
            return added
        variants = entry or Variants(f"`{step_name}` ({batch.where})")
        self.runtimes[key] = variants
        self._numbers = current_numbers(module, batch_idx, numbers_read([added[0], *captures]))
        return variants.add(*added)

    def _add_runtime(
        self, step_name: str, batch: FlatBatch, extra_args: tuple[Any, ...], batch_idx: int
    ) -> tuple[CapturedStep, PipelineRuntime] | NotPipelined:
        pipeline = self.pipeline
        named = f"`{step_name}` ({batch.where})"
        try:
            num_microbatches = choose_microbatches(batch.size, pipeline.plan.num_microbatches)
            capture = fake_capture(
                pipeline.module, batch, num_microbatches, pipeline.device, step_name, extra_args, batch_idx
            )
            with capture as (captured, graph, _):
                check_combinable(graph.outputs, batch.size // num_microbatches, named)
        except (CaptureError, RuntimeSetupError) as error:
            log.debug("%s cannot be captured", named, exc_info=True)
            return NotPipelined(str(error))
        if captured.changed_attributes:
            return NotPipelined(
                f"{named} changes {', '.join(f'self.{a}' for a in captured.changed_attributes)}: it runs as a "
                "captured graph, whose Python side effects happen only once, at capture."
            )
        plan = self._plan(graph, num_microbatches)
        if plan is None:
            return NotPipelined(
                f"{named} computes with the parameters in another order than `training_step`: a stage would need "
                "another stage's parameters."
            )
        constants = {n: t for n, t in captured.tensors.items() if n.startswith(CONSTANT_PREFIX)}
        graph.tensors = {**pipeline.captured.tensors, **constants}  # this rank's real tensors, the step's constants
        runtime = PipelineRuntime(
            graph,
            plan,
            pipeline.rank,
            pipeline.device,
            pipeline.groups,
            forward_only=True,
            reductions=captured.output_reductions,
            holders=pipeline.ownership.holders,
        )
        captured.forget_tensors_except(set())
        return captured, runtime

    def _plan(self, graph: StepGraph, num_microbatches: int) -> PartitionPlan | None:
        """The training plan's split moved onto an evaluation step's graph, matching nodes by
        op and module; ``None`` when a stage would need parameters its ranks do not hold."""
        plan = self.pipeline.plan
        stages = moved_stages(plan, align_nodes(self.pipeline.node_keys, graph.node_keys()), len(graph))
        for stage in stages:
            needed = {
                n for n in graph.tensor_names(stage.node_start, stage.node_end) if not n.startswith(CONSTANT_PREFIX)
            }
            if not needed <= set(stage.tensor_names):
                return None
        # No backward: nothing to recompute, and no 1F1B (the runtime runs a fill and drain).
        stages = [
            dataclasses.replace(s, checkpoint=False, recompute_end=None, recompute_span="", recompute_cuts=[])
            for s in stages
        ]
        return dataclasses.replace(plan, stages=stages, num_microbatches=num_microbatches, no_grad_values=[])


def _returned(captured: CapturedStep, values: list[torch.Tensor], batch: Any) -> Any:
    """What the step returned, rebuilt: its tensors from the graph, the rest from the capture."""
    logged = sum(item.output_index is not None for item in captured.logged)
    returned = values[logged : captured.first_metric_output]
    leaves_out = list(captured.output_constants)
    for position, value in zip(captured.output_tensor_positions, returned, strict=True):
        leaves_out[position] = value
    batch_leaves = tree_flatten(batch)[0]
    for position, batch_position in captured.output_batch_leaves.items():
        leaves_out[position] = batch_leaves[batch_position]
    assert captured.output_spec is not None
    return tree_unflatten(leaves_out, captured.output_spec)


def check_combinable(outputs: list[torch.fx.Node], microbatch_size: int, where: str) -> None:
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


def moved_stages(plan: PartitionPlan, matched: dict[int, int], num_nodes: int) -> list[StagePlan]:
    """The plan's stages on another graph of ``num_nodes`` nodes: each starts at the first node
    matching one at or after its old start (the first stage at 0, whatever comes before)."""
    starts = [0] + [_next_matched(matched, s.node_start, num_nodes) for s in plan.stages[1:]] + [num_nodes]
    return [
        dataclasses.replace(s, node_start=a, node_end=b, **_moved_recompute(s, matched, a, b, num_nodes))
        for s, a, b in zip(plan.stages, starts, starts[1:])
    ]


def _moved_recompute(stage: StagePlan, matched: dict[int, int], start: int, end: int, num_nodes: int) -> dict:
    """Selective checkpointing's cut on the other graph; where it falls outside the moved stage,
    the whole stage recomputes (never more memory than planned)."""
    if stage.recompute_end is None:
        return {}
    cut = _next_matched(matched, stage.recompute_end, num_nodes)
    if not start < cut < end:
        return {"recompute_end": None, "recompute_cuts": [], "checkpoint": True}
    # a region boundary that lands on another or outside is dropped: its layer recomputes with the next
    regions = sorted(
        {c for c in (_next_matched(matched, c, num_nodes) for c in stage.recompute_cuts) if start < c < cut}
    )
    return {"recompute_end": cut, "recompute_cuts": regions}


def _next_matched(matched: dict[int, int], index: int, default: int) -> int:
    """New index of the first node at or after ``index`` that both captures share."""
    later = [matched[i] for i in matched if i >= index]
    return min(later) if later else default
