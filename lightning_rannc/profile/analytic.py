"""Costs estimated from the graph alone, for modules that exist only on the meta device.

A model too large for one device cannot be profiled by running it. Here every node runs on
fake tensors (no memory, no compute) under ``torch.utils.flop_counter``: a block's forward
time is its FLOPs over a nominal device throughput, plus a small fixed cost per node; backward
is twice the forward; activations are the bytes of the floating-point values the block makes.
Only the relative sizes matter for the stage split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx
from torch.utils.flop_counter import FlopCounterMode

from lightning_rannc._utils import tensor_bytes
from lightning_rannc.capture.graph import StepGraph
from lightning_rannc.plan.cost_model import BlockCost

__all__ = ["estimate_blocks", "NOMINAL_FLOPS_PER_MS", "NODE_OVERHEAD_MS"]

NOMINAL_FLOPS_PER_MS = 1e9
NODE_OVERHEAD_MS = 1e-3


class _CountingInterpreter(fx.Interpreter):
    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module, garbage_collect_values=False)
        self.flops: dict[fx.Node, int] = {}

    def run_node(self, node: fx.Node) -> Any:
        with FlopCounterMode(display=False) as counter:
            result = super().run_node(node)
        self.flops[node] = counter.get_total_flops()
        return result


def estimate_blocks(
    graph: StepGraph, fake_leaves: Sequence[torch.Tensor], spans: Sequence[tuple[int, int]]
) -> list[BlockCost]:
    """Analytic ``BlockCost`` of each block ``(start, end)``; ``graph.tensors`` and the leaves
    must be fake tensors of one fake mode (see ``fake_module_state``)."""
    inputs = iter(fake_leaves)
    args = [
        graph.tensors[graph.tensor_of[n]] if n in graph.tensor_of else next(inputs)
        for n in graph.graph_module.graph.nodes
        if n.op == "placeholder"
    ]
    interpreter = _CountingInterpreter(graph.graph_module)
    with torch.no_grad():
        interpreter.run(*args)
    cut_bytes = graph.cut_bytes()
    return [_block(graph, interpreter, a, b, cut_bytes[b]) for a, b in spans]


def _block(graph: StepGraph, interpreter: _CountingInterpreter, start: int, end: int, cut_bytes: int) -> BlockCost:
    nodes = graph.nodes[start:end]
    flops = sum(interpreter.flops.get(n, 0) for n in nodes)
    fwd_ms = flops / NOMINAL_FLOPS_PER_MS + NODE_OVERHEAD_MS * len(nodes)
    values = [n.meta.get("val") for n in nodes]
    activation_bytes = sum(tensor_bytes(v) for v in values if isinstance(v, torch.Tensor) and v.is_floating_point())
    return BlockCost(
        start=start,
        end=end,
        fwd_ms=fwd_ms,
        bwd_ms=2 * fwd_ms,
        activation_bytes=activation_bytes,
        cut_bytes=cut_bytes,
        tensor_names=tuple(graph.tensor_names(start, end)),
        module_paths=tuple(dict.fromkeys(graph.module_path(i) for i in range(start, end))),
    )
