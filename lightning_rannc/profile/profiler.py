"""Measure forward/backward time and activation memory of graph blocks on the training device.

Each block is cut out of the captured graph exactly as a stage would be, fed the real values
the full graph produces for one micro-batch, and timed forward and backward. Activation memory
is what autograd saves for backward, counted through ``saved_tensors_hooks``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import fx

from lightning_rannc.capture.graph import StepGraph
from lightning_rannc.capture.split import build_range_module
from lightning_rannc.plan.cost_model import BlockCost

__all__ = ["profile_blocks", "run_graph", "find_no_grad_values", "buffers_restored"]


def run_graph(graph: StepGraph, leaves: Sequence[torch.Tensor], grad: bool = False) -> dict[fx.Node, Any]:
    """Run the whole captured graph on one micro-batch; return every node's value."""
    inputs = iter(leaves)
    args = [
        graph.tensors[graph.tensor_of[n]] if n in graph.tensor_of else next(inputs)
        for n in graph.graph_module.graph.nodes
        if n.op == "placeholder"
    ]
    interpreter = fx.Interpreter(graph.graph_module, garbage_collect_values=False)
    with torch.set_grad_enabled(grad):
        interpreter.run(*args)
    return interpreter.env


def profile_blocks(
    graph: StepGraph, leaves: Sequence[torch.Tensor], spans: Sequence[tuple[int, int]], repeats: int = 3
) -> list[BlockCost]:
    """Profile each block ``(start, end)`` of ``graph`` on one micro-batch ``leaves``."""
    devices = [leaves[0].device] if leaves[0].device.type == "cuda" else []
    cut_bytes = graph.cut_bytes()
    # Profiling runs random ops (dropout) and updates buffers (BatchNorm statistics) many
    # times: keep the training RNG stream and the buffers as they were.
    with torch.random.fork_rng(devices=devices), buffers_restored(graph):
        values = run_graph(graph, leaves)
        costs = [_profile_block(graph, values, a, b, cut_bytes[b], repeats) for a, b in spans]
    for tensor in graph.tensors.values():
        tensor.grad = None
    return costs


def _profile_block(
    graph: StepGraph, values: dict[fx.Node, Any], start: int, end: int, cut_bytes: int, repeats: int
) -> BlockCost:
    module = build_range_module(graph, start, end)
    inputs = [_as_input(values[v]) for v in graph.stage_inputs(start)]
    fwd_ms, bwd_ms, activation_bytes = _time_block(module, inputs, repeats)
    return BlockCost(
        start=start,
        end=end,
        fwd_ms=fwd_ms,
        bwd_ms=bwd_ms,
        activation_bytes=activation_bytes,
        cut_bytes=cut_bytes,
        tensor_names=tuple(graph.tensor_names(start, end)),
        module_paths=tuple(dict.fromkeys(graph.module_path(i) for i in range(start, end))),
    )


def _as_input(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().requires_grad_(True)
    return value


class _SavedBytes:
    """Counts the distinct storages autograd saves for backward, parameters excluded."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.skip = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
        self.sizes: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.sizes[storage.data_ptr()] = storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def _time_block(module: torch.nn.Module, inputs: list[Any], repeats: int) -> tuple[float, float, int]:
    saved = _SavedBytes(module)
    fwd, bwd = [], []
    for attempt in range(repeats + 1):  # the first run warms up and counts saved bytes
        start = _now(inputs)
        counting = torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack)
        with counting if attempt == 0 else contextlib.nullcontext():
            outputs = module(*inputs)
        middle = _now(inputs)
        roots = [o for o in outputs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
        if roots:
            torch.autograd.backward(roots, [torch.ones_like(o) for o in roots])
        end = _now(inputs)
        if attempt:
            fwd.append(middle - start)
            bwd.append(end - middle)
    return statistics.median(fwd), statistics.median(bwd), sum(saved.sizes.values())


def _now(inputs: list[Any]) -> float:
    if any(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs):
        torch.cuda.synchronize()
    return time.perf_counter() * 1e3


def find_no_grad_values(graph: StepGraph, leaves: Sequence[torch.Tensor], boundaries: Sequence[int]) -> list[str]:
    """Names of float values leaving a stage that must carry no gradient.

    Considered: the values crossing the given cuts and the graph's outputs other than the loss.
    A stage output marked as requiring grad expects a gradient back from the next stage; a value
    that does not depend on parameters, or that the loss does not depend on differentiably (a
    logged metric, an argmax input), would never get one. The runtime detaches these values
    where they leave their stage and declares them gradient-free to the pipeline.
    """
    leaving = [v for b in boundaries for v in graph.live_values(b)] + list(graph.outputs[1:])
    devices = [leaves[0].device] if leaves[0].device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), buffers_restored(graph):
        values = run_graph(graph, leaves, grad=True)
        floats = [v for v in dict.fromkeys(leaving) if _is_float(values.get(v))]
        loss = values[graph.outputs[0]]
        with_grad = [v for v in floats if values[v].requires_grad]
        grads = torch.autograd.grad(loss, [values[v] for v in with_grad], allow_unused=True) if with_grad else ()
    receives = {v for v, g in zip(with_grad, grads) if g is not None}
    return [v.name for v in floats if v not in receives]


@contextlib.contextmanager
def buffers_restored(graph: StepGraph) -> Iterator[None]:
    buffers = [t for t in graph.tensors.values() if not isinstance(t, torch.nn.Parameter)]
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


def _is_float(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()
