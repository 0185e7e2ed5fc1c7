"""Measure forward/backward time and activation memory of graph blocks on the training device.

Each block is cut out of the captured graph exactly as a stage would be, fed the real values
the full graph produces for one micro-batch, and timed forward and backward. Activation memory
is what autograd saves for backward, counted through ``saved_tensors_hooks``; the workspace is
the most the block holds beyond that and its parameters' gradients, followed storage by storage
in its first (warm-up) run, as the analytic estimate does.

A module that only just fits on the device must still be profiled there: the whole graph runs
once without autograd, keeping only the values that blocks take as inputs, and each block's
parameter gradients are dropped once it is timed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx

from lightning_rannc._compat import FakeTensorMode, is_fake
from lightning_rannc.capture.graph import StepGraph
from lightning_rannc.capture.split import build_range_module
from lightning_rannc.plan.cost_model import BlockCost
from lightning_rannc.profile.storages import AllocationLog, AllocationWatch, most_live

__all__ = ["profile_blocks", "backward_call_ms", "run_graph", "find_no_grad_values", "buffers_restored"]


def run_graph(
    graph: StepGraph,
    leaves: Sequence[torch.Tensor],
    grad: bool = False,
    keep: Collection[fx.Node] | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> dict[fx.Node, Any]:
    """Run the whole captured graph on one micro-batch; return every node's value, or with
    ``keep`` only those nodes' (the others are freed as soon as no later node needs them).
    ``tensors`` replaces the graph's parameters and buffers (fake copies, say)."""
    tensors = graph.tensors if tensors is None else tensors
    inputs = iter(leaves)
    args = [
        tensors[graph.tensor_of[n]] if n in graph.tensor_of else next(inputs)
        for n in graph.graph_module.graph.nodes
        if n.op == "placeholder"
    ]
    interpreter = _Keeping(graph.graph_module, keep)
    with torch.set_grad_enabled(grad):
        interpreter.run(*args)
    return interpreter.env if keep is None else interpreter.kept


class _Keeping(fx.Interpreter):
    """An interpreter that keeps every value (``keep=None``) or only those of ``keep``."""

    def __init__(self, graph_module: fx.GraphModule, keep: Collection[fx.Node] | None) -> None:
        super().__init__(graph_module, garbage_collect_values=keep is not None)
        self.keep = set(keep or ())
        self.kept: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n in self.keep:
            self.kept[n] = value
        return value


def profile_blocks(
    graph: StepGraph, leaves: Sequence[torch.Tensor], spans: Sequence[tuple[int, int]], repeats: int = 3
) -> list[BlockCost]:
    """Profile each block ``(start, end)`` of ``graph`` on one micro-batch ``leaves``."""
    devices = [leaves[0].device] if leaves[0].device.type == "cuda" else []
    cut_bytes = graph.cut_bytes()
    needed = {v for a, _ in spans for v in graph.stage_inputs(a)}
    # Profiling runs random ops (dropout) and updates buffers (BatchNorm statistics) many
    # times: keep the training RNG stream and the buffers as they were.
    with torch.random.fork_rng(devices=devices), buffers_restored(graph):
        values = run_graph(graph, leaves, keep=needed)
        costs = [_profile_block(graph, values, a, b, cut_bytes[b], repeats) for a, b in spans]
    costs = _without_backward_calls(costs, backward_call_ms(leaves[0].device))
    del values
    if devices:
        # What profiling cached is not what training allocates: hand it back, so the first
        # steps do not fragment around it.
        torch.cuda.empty_cache()
    return costs


def _profile_block(
    graph: StepGraph, values: dict[fx.Node, Any], start: int, end: int, cut_bytes: int, repeats: int
) -> BlockCost:
    module = build_range_module(graph, start, end)
    inputs = [_as_input(values[v]) for v in graph.stage_inputs(start)]
    fwd_ms, bwd_ms, activation_bytes, workspace_bytes = _time_block(module, inputs, repeats)
    for tensor in [*module.parameters(), *graph.tensors.values()]:
        tensor.grad = None  # one block's gradients at a time, never the whole model's
    return BlockCost(
        start=start,
        end=end,
        fwd_ms=fwd_ms,
        bwd_ms=bwd_ms,
        activation_bytes=activation_bytes,
        cut_bytes=cut_bytes,
        tensor_names=tuple(graph.tensor_names(start, end)),
        module_paths=tuple(dict.fromkeys(graph.module_path(i) for i in range(start, end))),
        workspace_bytes=workspace_bytes,
    )


def backward_call_ms(device: torch.device, repeats: int = 100) -> float:
    """What one ``torch.autograd.backward`` call costs beyond its operators' work: the root
    gradient made, the engine started, one trivial node run (median of ``repeats``)."""
    leaf = torch.zeros(1, device=device, requires_grad=True)
    synced = leaf.device if leaf.is_cuda else None
    times = []
    for _ in range(repeats + 1):
        root = leaf * 1.0
        start = _now(synced)
        torch.autograd.backward([root], [torch.ones_like(root)])
        times.append(_now(synced) - start)
    return statistics.median(times[1:])  # the first warms up


def _without_backward_calls(costs: list[BlockCost], call_ms: float) -> list[BlockCost]:
    """``costs`` without one backward call's cost in each block's backward time.

    Each block is timed by its own backward call; a stage runs its blocks' backwards in one.
    Summed over the ~100 blocks of a stage, the calls made the profile's backward of the example
    GPT 1.24x of its two halves each timed whole at 2 samples (1.11x at 4;
    ``benchmarks/profile_sizes.py --halves``). The runtime's cost per call is the device's
    ``action_overhead_ms``, once per stage and micro-batch."""
    return [
        dataclasses.replace(cost, bwd_ms=max(cost.bwd_ms - call_ms, 0.0)) if cost.bwd_ms > 0 else cost for cost in costs
    ]


def _as_input(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().requires_grad_(True)
    return value


class _SavedBytes:
    """Counts the distinct storages autograd saves for backward, parameters excluded."""

    def __init__(self, module: torch.nn.Module, allocations: AllocationLog) -> None:
        self.skip = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
        self.sizes: dict[int, int] = {}
        self.allocations = allocations
        self.serials: set[int] = set()
        """Allocation serials of the saved storages (the workspace leaves them out)."""

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.sizes[storage.data_ptr()] = storage.nbytes()
            self.serials.add(self.allocations.serial_of(tensor))
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def _time_block(module: torch.nn.Module, inputs: list[Any], repeats: int) -> tuple[float, float, int, int]:
    """Median forward and backward times, saved bytes and workspace bytes of one block."""
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    device = next((t.device for t in tensors if t.is_cuda), None)
    allocations = AllocationLog([*module.parameters(), *module.buffers(), *tensors])
    saved = _SavedBytes(module, allocations)
    fwd, bwd = [], []
    for attempt in range(repeats + 1):  # the first run warms up and counts bytes
        counting = attempt == 0
        start = _now(device)
        with _counting(saved, allocations) if counting else contextlib.nullcontext():
            outputs = module(*inputs)
            middle = _now(device)
            roots = [o for o in outputs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
            if roots:
                torch.autograd.backward(roots, [torch.ones_like(o) for o in roots])
            del outputs, roots
        end = _now(device)
        if counting:
            grads = {allocations.serial_of(p.grad) for p in module.parameters() if p.grad is not None}
            allocations.close()
            workspace = most_live(allocations.events, saved.serials | grads, 1)[0]
        else:
            fwd.append(middle - start)
            bwd.append(end - middle)
    return statistics.median(fwd), statistics.median(bwd), sum(saved.sizes.values()), workspace


@contextlib.contextmanager
def _counting(saved: _SavedBytes, allocations: AllocationLog) -> Iterator[None]:
    with AllocationWatch(allocations), torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        yield


def _now(device: torch.device | None) -> float:
    if device is not None:
        torch.cuda.synchronize(device)
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
    # Only whether values need gradients matters: run on fake tensors, which hold no memory
    # (the whole step with autograd would hold every activation of the model at once).
    with _faked(graph, leaves) as (tensors, fake_leaves):
        values = run_graph(graph, fake_leaves, grad=True, tensors=tensors)
        floats = [v for v in dict.fromkeys(leaving) if _is_float(values.get(v))]
        loss = values[graph.outputs[0]]
        with_grad = [v for v in floats if values[v].requires_grad]
        grads = torch.autograd.grad(loss, [values[v] for v in with_grad], allow_unused=True) if with_grad else ()
    receives = {v for v, g in zip(with_grad, grads) if g is not None}
    return [v.name for v in floats if v not in receives]


@contextlib.contextmanager
def _faked(
    graph: StepGraph, leaves: Sequence[torch.Tensor]
) -> Iterator[tuple[Mapping[str, torch.Tensor], Sequence[torch.Tensor]]]:
    """The graph's tensors and ``leaves`` as fake tensors (as they are, when already fake)."""
    if any(is_fake(t) for t in [*leaves, *graph.tensors.values()]):
        yield graph.tensors, leaves
        return
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    tensors = {name: _fake(mode, t) for name, t in graph.tensors.items()}
    fake_leaves = [mode.from_tensor(t) for t in leaves]
    with mode:
        yield tensors, fake_leaves


def _fake(mode: FakeTensorMode, tensor: torch.Tensor) -> torch.Tensor:
    fake = mode.from_tensor(tensor)
    if tensor.requires_grad and not fake.requires_grad:
        fake.requires_grad_(True)
    return fake


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
