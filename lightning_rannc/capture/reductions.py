"""How each scalar a step computes combines over micro-batches.

One device computes a logged value (or the loss) over the whole batch; the pipeline computes it
per micro-batch and must combine the pieces into what one device would have. That depends on
how the value reduces over samples: a mean of micro-batch means is the batch mean, but the
batch maximum is the maximum of the micro-batch maxima, and a batch sum their sum. The graph
says which: the value's last op (through copies, casts and views) is ``sum``/``mean``/``amax``/
``max``/``amin``/``min`` of a per-sample tensor, or a loss op with its ``reduction`` argument.
When the graph does not say, the user's ``reduce_fx`` does; a value that does not depend on the
batch is the same for every micro-batch, and any mean of it is itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_rannc._compat import op_schema

__all__ = ["Reduction", "MEAN", "SUM", "MAX", "MIN", "declared_reduction", "output_reductions", "combine_scalars"]

MEAN, SUM, MAX, MIN = "mean", "sum", "max", "min"

Reduction = str | Callable[[torch.Tensor], torch.Tensor]
"""One of ``MEAN``/``SUM``/``MAX``/``MIN``, or the user's own ``reduce_fx`` callable."""

# Ops that keep the value (a detached, cast or reshaped scalar is still the same reduction).
_SAME_VALUE = {
    "aten.detach",
    "aten.alias",
    "aten.clone",
    "aten.to",
    "aten._to_copy",
    "aten.view",
    "aten.reshape",
    "aten.squeeze",
    "aten.unsqueeze",
    "aten.lift_fresh_copy",
    "aten.contiguous",
    "aten.type_as",
}
_REDUCING_OPS = {
    "aten.sum": SUM,
    "aten.mean": MEAN,
    "aten.amax": MAX,
    "aten.max": MAX,
    "aten.amin": MIN,
    "aten.min": MIN,
}
_LOSS_REDUCTION = {1: MEAN, 2: SUM}  # torch's Reduction enum: 0 none, 1 mean, 2 sum
_NAMED = {"mean": MEAN, "avg": MEAN, "sum": SUM, "max": MAX, "min": MIN}
_NAMED_CALLABLES: dict[Any, str] = {
    torch.mean: MEAN,
    torch.sum: SUM,
    torch.max: MAX,
    torch.amax: MAX,
    torch.min: MIN,
    torch.amin: MIN,
}


def declared_reduction(reduce_fx: Any) -> Reduction:
    """A ``self.log(..., reduce_fx=...)`` value as a reduction (Lightning's names and callables)."""
    if isinstance(reduce_fx, str):
        return _NAMED.get(reduce_fx.lower(), MEAN)
    return _NAMED_CALLABLES.get(reduce_fx, reduce_fx) if callable(reduce_fx) else MEAN


def output_reductions(
    graph: torch.fx.Graph,
    user_inputs: set[str],
    microbatch_size: int,
    declared: dict[int, Reduction],
) -> dict[int, Reduction]:
    """For every scalar output of ``graph``: how it combines over micro-batches. ``declared``
    holds the ``reduce_fx`` of logged outputs, used where the graph does not tell."""
    outputs = _output_nodes(graph)
    on_batch = _batch_dependent(graph, user_inputs)
    reductions: dict[int, Reduction] = {}
    for index, node in enumerate(outputs):
        value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            continue
        if node not in on_batch:  # the same on every micro-batch
            reductions[index] = MEAN
            continue
        reductions[index] = _reduction_of(node, microbatch_size) or declared.get(index, MEAN)
    return reductions


def combine_scalars(per_microbatch: Sequence[torch.Tensor], reduction: Reduction) -> torch.Tensor:
    """One scalar over the micro-batches, in float64 (``per_microbatch`` are scalars)."""
    stacked = torch.stack([v.reshape(()) for v in per_microbatch]).to(torch.float64)
    if reduction == MEAN:
        return stacked.mean()
    if reduction == SUM:
        return stacked.sum()
    if reduction == MAX:
        return stacked.max()
    if reduction == MIN:
        return stacked.min()
    assert callable(reduction)
    return torch.as_tensor(reduction(stacked), dtype=torch.float64, device=stacked.device).reshape(())


def _output_nodes(graph: torch.fx.Graph) -> Sequence[Any]:
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    values = output.args[0]
    return values if isinstance(values, (list, tuple)) else [values]


def _batch_dependent(graph: torch.fx.Graph, user_inputs: set[str]) -> set[torch.fx.Node]:
    depends: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if (node.op == "placeholder" and node.name in user_inputs) or any(a in depends for a in node.all_input_nodes):
            depends.add(node)
    return depends


def _reduction_of(node: torch.fx.Node, microbatch_size: int) -> Reduction | None:
    """The reduction over samples that produced ``node``, when its ops show it."""
    while node.op == "call_function" and _packet(node) in _SAME_VALUE and node.all_input_nodes:
        node = node.all_input_nodes[0]
    if node.op != "call_function":
        return None
    packet = _packet(node)
    if packet in _REDUCING_OPS and node.all_input_nodes:
        reduced = node.all_input_nodes[0].meta.get("val")
        per_sample = isinstance(reduced, torch.Tensor) and reduced.dim() > 0 and reduced.shape[0] == microbatch_size
        return _REDUCING_OPS[packet] if per_sample else None
    return _loss_reduction(node)


def _loss_reduction(node: torch.fx.Node) -> Reduction | None:
    """A loss op's ``reduction`` argument (given, or the schema's default)."""
    schema = op_schema(node.target)
    if schema is None:
        return None
    for position, argument in enumerate(schema.arguments):
        if argument.name != "reduction":
            continue
        if argument.name in node.kwargs:
            value = node.kwargs[argument.name]
        elif position < len(node.args):
            value = node.args[position]
        else:
            value = argument.default_value
        return _LOSS_REDUCTION.get(value) if isinstance(value, int) else None
    return None


def _packet(node: torch.fx.Node) -> str:
    """``aten.sum`` for ``aten.sum.dim_IntList``."""
    return str(node.target).rsplit(".", 1)[0]
