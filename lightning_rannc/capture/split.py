"""Cut the captured graph into stage modules.

Each stage becomes an ``fx.GraphModule`` that holds only the parameters and buffers its own
nodes use, under their names in the user's LightningModule (``blocks.3.attn.weight``), as the
*same* tensor objects: the user's optimizer, LR schedulers and hooks keep seeing them.
Its inputs are the values live across its start cut, its outputs those live across its end cut,
so values needed several stages later (labels, masks, skip connections) are passed along.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import fx

from lightning_rannc import _rng
from lightning_rannc.capture.graph import StepGraph

__all__ = ["build_range_module"]


def build_range_module(
    graph: StepGraph, start: int, end: int, detach: Collection[str] = (), fresh_outputs: bool = False
) -> fx.GraphModule:
    """Build the module computing nodes ``[start, end)`` of ``graph``.

    Args:
        graph: the captured step.
        start: first node of the range.
        end: one past the last node of the range.
        detach: names of output values to detach: they cross the cut but carry no gradient.
        fresh_outputs: return copies of the values crossing the end cut, never the tensors
            themselves. Zero-bubble schedules need this: after the input gradients torch detaches
            the stage's outputs in place (``stage_backward_input``), which would break the weight
            gradient's backward when an output is also a tensor saved inside the stage.

    Returns:
        A GraphModule taking ``graph.stage_inputs(start)`` and returning a tuple of
        ``graph.stage_outputs(end)``.
    """
    new_graph = fx.Graph()
    root: dict[str, Any] = {}
    env: dict[fx.Node, fx.Node] = {v: new_graph.placeholder(v.name) for v in graph.stage_inputs(start)}

    def lookup(value: fx.Node) -> fx.Node:
        if value not in env:
            # Only parameters, buffers and constants may be missing: they become attributes.
            name = graph.tensor_of[value]
            root[name] = graph.tensors[name]
            env[value] = new_graph.get_attr(name)
            env[value].meta = dict(value.meta)
        return env[value]

    for index, node in enumerate(graph.nodes[start:end], start):
        if node.op == "get_attr":
            root[str(node.target)] = _get_attr(graph.graph_module, str(node.target))
        if _rng.is_random(node.target):
            new_graph.call_function(_rng.reseed, (index,))  # see lightning_rannc/_rng.py
        env[node] = new_graph.node_copy(node, lookup)

    outputs = []
    for value in graph.stage_outputs(end):
        out = lookup(value)
        if value.name in detach:
            out = new_graph.call_function(torch.ops.aten.detach.default, (out,))
        if end < len(graph) and isinstance(value.meta.get("val"), torch.Tensor):
            # Point-to-point sends move raw memory: a strided view would arrive scrambled.
            if fresh_outputs:
                out = new_graph.call_function(
                    torch.ops.aten.clone.default, (out,), {"memory_format": torch.contiguous_format}
                )
            else:
                out = new_graph.call_function(torch.ops.aten.contiguous.default, (out,))
        outputs.append(out)
    new_graph.output(tuple(outputs))
    module = fx.GraphModule(root, new_graph)
    module.recompile()
    return module


def _get_attr(module: torch.nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module
