"""Replay a captured step's side effects after it ran through the pipeline.

The step's ``self.log`` and torchmetrics calls were recorded at capture (``capture/recording.py``).
After each pipelined step, every rank replays them in their order: each ``self.log`` with its
value, now equal on every rank (of the pipeline, for evaluation steps: replicas log their own
shard's values, as with DDP), and each torchmetrics call with the whole batch's arguments.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_rannc._compat import tree_unflatten
from lightning_rannc.capture.export import CapturedStep
from lightning_rannc.capture.guards import Source, evaluate
from lightning_rannc.capture.recording import LoggedValue, MetricCall

__all__ = ["replay_logs", "step_output"]


def replay_logs(
    module: nn.Module,
    captured: CapturedStep,
    values: torch.Tensor | list[torch.Tensor],
    tensor_outputs: list[torch.Tensor],
    numbers: dict[Source, Any] | None = None,
) -> None:
    """Replay ``captured``'s side effects with the step's ``values`` (its combined scalar outputs),
    ``tensor_outputs`` (the outputs from ``first_tensor_output`` on, concatenated) and ``numbers``
    (the step's values of the changing numbers logged, such as the learning rate)."""
    results: list[Any] = []  # what each metric call returned, by call index
    events: list[LoggedValue | MetricCall] = sorted([*captured.logged, *captured.metric_calls], key=_order)
    for event in events:
        if isinstance(event, MetricCall):
            results.append(_replay_metric_call(module, event, tensor_outputs, captured.first_tensor_output))
        else:
            value = _logged_value(module, event, values, results, numbers or {})
            module.log(event.name, value, **event.kwargs)  # type: ignore[operator]


def step_output(
    captured: CapturedStep, values: torch.Tensor, tensor_outputs: list[torch.Tensor]
) -> torch.Tensor | dict[str, torch.Tensor]:
    """What ``training_step`` returned, rebuilt from the step's values: the loss, or a dict in the
    user's key order (scalars averaged over micro-batches, per-sample tensors concatenated)."""
    loss = values[0].float()
    if not captured.returns_dict:
        return loss
    first_extra = 1 + sum(item.output_index is not None for item in captured.logged)
    returned = {k: values[first_extra + i].float() for i, k in enumerate(captured.extra_keys)}
    returned.update(zip(captured.tensor_extra_keys, tensor_outputs))
    return {"loss": loss, **{k: returned[k] for k in captured.returned_keys if k != "loss"}}


def _logged_value(
    module: nn.Module,
    item: LoggedValue,
    values: torch.Tensor | list[torch.Tensor],
    results: list[Any],
    numbers: dict[Source, Any],
) -> Any:
    if item.metric is not None:
        return module.get_submodule(item.metric)
    if item.metric_call is not None:
        index, key = item.metric_call
        return results[index] if key is None else results[index][key]
    if item.expression is not None:
        return evaluate(item.expression, numbers)
    return item.constant if item.output_index is None else values[item.output_index].float()


def _replay_metric_call(module: nn.Module, call: MetricCall, tensor_outputs: list[torch.Tensor], first: int) -> Any:
    leaves = list(call.constants)
    start = call.first_output - first
    for offset, position in enumerate(call.tensor_positions):
        leaves[position] = tensor_outputs[start + offset]
    args, kwargs = tree_unflatten(leaves, call.arguments_spec)
    metric: Any = module.get_submodule(call.path)
    return metric(*args, **kwargs) if call.method == "forward" else metric.update(*args, **kwargs)


def _order(event: LoggedValue | MetricCall) -> int:
    return event.order
