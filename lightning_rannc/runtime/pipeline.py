"""Run this rank's stage of a plan with ``torch.distributed.pipelining``.

One ``PipelineRuntime`` per rank: it builds the rank's stage module from the captured graph,
wraps it in a ``PipelineStage`` and a schedule, runs a whole step (every micro-batch forward and
backward), and hands the step's outputs (loss, logged values) to every rank.

Lightning zeroes gradients between ``training_step`` and ``backward`` (see
``_AutomaticOptimization``), but the schedule runs backward inside ``training_step``. So the
step's gradients are held aside (``pending``) and added to ``.grad`` when Lightning calls
``backward``; gradient accumulation and zero-grad hooks keep their meaning.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import fx
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

from lightning_rannc.capture.graph import StepGraph
from lightning_rannc.capture.split import build_range_module
from lightning_rannc.plan.plan import PartitionPlan

__all__ = ["PipelineRuntime"]

_STEP_TAKES_RETURN_OUTPUTS = "return_outputs" in inspect.signature(ScheduleGPipe.step).parameters


class PipelineRuntime:
    """This rank's stage of ``plan``, ready to run steps.

    Must be constructed on every rank in the same order: it creates process groups.
    """

    def __init__(self, graph: StepGraph, plan: PartitionPlan, rank: int, device: torch.device) -> None:
        self.plan = plan
        self.device = device
        self.stage_plan = plan.stage_of_rank(rank)
        self.module = build_range_module(
            graph, self.stage_plan.node_start, self.stage_plan.node_end, detach=set(plan.no_grad_values)
        )
        self.num_outputs = len(graph.outputs)
        self._last_rank = plan.stages[-1].ranks[0]
        # Static metadata: without it the pipeline infers shapes by running the stage on
        # uninitialised tensors, which breaks ops that check their integer inputs (labels).
        start, end = self.stage_plan.node_start, self.stage_plan.node_end
        no_grad = set(plan.no_grad_values)
        self._stage = PipelineStage(
            self.module,
            self.stage_plan.stage_index,
            plan.num_stages,
            device,
            input_args=_examples(graph.stage_inputs(start), no_grad, device, root=start == 0),
            output_args=_examples(graph.stage_outputs(end), no_grad, device, root=False),
        )
        self._schedule = ScheduleGPipe(
            self._stage, n_microbatches=plan.num_microbatches, loss_fn=self._loss_fn, scale_grads=True
        )
        self._outputs: list[list[torch.Tensor]] = []
        self._pending: dict[torch.nn.Parameter, torch.Tensor | None] = {}
        self._tied = _tied_parameter_groups(graph, plan, rank)
        self._params = [p for p in self.module.parameters() if p.requires_grad]

    @property
    def local_tensor_names(self) -> list[str]:
        return list(self.stage_plan.tensor_names)

    def _loss_fn(self, output: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        # `target` is the micro-batch index (see `run`): keep outputs in micro-batch order.
        self._outputs[int(target.reshape(-1)[0])] = [o.detach() for o in output]
        return output[0]

    def run(self, leaves: Sequence[torch.Tensor]) -> torch.Tensor:
        """Run one step; return the mean over micro-batches of every graph output, on every rank."""
        num_microbatches = self.plan.num_microbatches
        self._outputs = [[] for _ in range(num_microbatches)]
        held = self._take_grads()
        args = tuple(leaves) if self._stage.is_first else ()
        kwargs: dict[str, Any] = {"return_outputs": False} if _STEP_TAKES_RETURN_OUTPUTS else {}
        target = torch.arange(num_microbatches, device=self.device)
        self._schedule.step(*args, target=target, **kwargs)
        self._pending = self._take_grads()
        for param, grad in held.items():
            param.grad = grad
        return self._share_outputs()

    def _take_grads(self) -> dict[torch.nn.Parameter, torch.Tensor | None]:
        grads = {p: p.grad for p in self._params}
        for param in self._params:
            param.grad = None
        return grads

    def _share_outputs(self) -> torch.Tensor:
        values = torch.zeros(self.num_outputs, dtype=torch.float64, device=self.device)
        if self._stage.is_last:
            per_mb = [torch.stack([o.reshape(()).to(torch.float64) for o in outs]) for outs in self._outputs]
            values = torch.stack(per_mb).mean(dim=0)
        dist.broadcast(values, src=self._last_rank)
        return values

    def accumulate_grads(self, scale: float) -> None:
        """Add the last step's gradients, times ``scale``, to ``.grad`` (Lightning's backward)."""
        pending, self._pending = self._pending, {}
        self._sum_tied(pending)
        for param, grad in pending.items():
            if grad is None:
                continue
            grad = grad * scale if scale != 1.0 else grad
            param.grad = grad if param.grad is None else param.grad + grad

    def _sum_tied(self, pending: dict[torch.nn.Parameter, torch.Tensor | None]) -> None:
        """Sum the gradients of parameters held by several stages, so their copies stay equal."""
        for group, params in self._tied:
            grads = [pending.get(p) for p in params]
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])
            dist.all_reduce(flat, group=group)
            for param, chunk in zip(params, flat.split([p.numel() for p in params])):
                pending[param] = chunk.view_as(param)


def _examples(
    values: Sequence[fx.Node], no_grad: set[str], device: torch.device, root: bool
) -> tuple[torch.Tensor, ...]:
    """Tensors with the shape, stride, dtype and requires_grad each value has at run time."""
    examples = []
    for value in values:
        fake = value.meta["val"]
        tensor = torch.empty(fake.shape, dtype=fake.dtype, device=device)
        if not root and fake.is_floating_point() and value.name not in no_grad:
            tensor.requires_grad_(True)
        examples.append(tensor)
    return tuple(examples)


def _tied_parameter_groups(
    graph: StepGraph, plan: PartitionPlan, rank: int
) -> list[tuple[dist.ProcessGroup, list[torch.nn.Parameter]]]:
    holders: dict[str, list[int]] = {}
    for stage in plan.stages:
        for name in stage.tensor_names:
            tensor = graph.tensors[name]
            if isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad:
                holders.setdefault(name, []).extend(stage.ranks)
    by_ranks: dict[tuple[int, ...], list[str]] = {}
    for name, holder_ranks in holders.items():
        if len(holder_ranks) > 1:
            by_ranks.setdefault(tuple(sorted(holder_ranks)), []).append(name)
    groups: list[tuple[dist.ProcessGroup, list[torch.nn.Parameter]]] = []
    for group_ranks, names in sorted(by_ranks.items()):
        group = dist.new_group(list(group_ranks))  # every rank must create every group, in the same order
        if rank in group_ranks and group is not None:
            groups.append((group, [graph.tensors[n] for n in names]))  # type: ignore[misc]
    return groups
