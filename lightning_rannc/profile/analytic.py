"""Costs estimated from the graph alone, for modules that exist only on the meta device.

A model too large for one device cannot be profiled by running it. Here the captured step runs
once forward and once backward on fake tensors (no memory, no compute) while a dispatch mode
notes every aten operator: its FLOPs, the bytes it reads and writes, the storages it allocates,
and the graph node it belongs to (a backward operator belongs to the node whose autograd node
runs it).

Time model (calibrated in ``tests/unit/test_calibration.py`` against whole training steps of
BERT-base and GPT-2 small measured on an H100, ``shared/data/h100_profile.json``):

- each operator takes ``max(FLOPs / matmul FLOP/s of its dtype, bytes read and written /
  memory bandwidth)`` of device time, plus ``KERNEL_MS`` (forward) or ``BACKWARD_KERNEL_MS``
  (backward) per kernel: the fixed part of the measured times (see the constants);
- the host spends ``device.op_overhead_ms`` per graph node that launches kernels (views cost
  nothing). Kernels run asynchronously, so the forward takes the longer of host and device
  time: BERT at batch 1 is launch-bound (7.9 ms, where batches 4 and 8 extrapolate to 4.6 ms).

Memory: ``activation_bytes`` are the distinct storages autograd saves, parameters and buffers
aside, as the profiler counts them; one saved by several blocks counts in the first.
``workspace_bytes`` is the most the block holds beyond saved storages and parameter gradients
while it runs forward or backward, followed storage by storage (the backward of a cross-entropy
over a large vocabulary holds two gradients of the logits).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop, sdpa_flop

from lightning_rannc._compat import (
    TorchDispatchMode,
    autograd_sequence_number,
    overload_packet,
    running_backward_sequence_number,
    storage_key,
)
from lightning_rannc.capture.graph import StepGraph
from lightning_rannc.plan.cost_model import BlockCost
from lightning_rannc.plan.devices import DeviceSpec, get_device
from lightning_rannc.profile.storages import AllocationLog, most_live, tensors_in

__all__ = ["estimate_blocks", "KERNEL_MS", "BACKWARD_KERNEL_MS"]

KERNEL_MS = 0.015
"""Device time per forward kernel beyond FLOPs and bytes (launch latency, small kernels far from
peak). H100 fit: measured forward minus the FLOP/byte time above, over the kernels, is 0.016 and
0.019 ms for GPT-2 (251 kernels) and 0.019 and 0.029 ms for BERT (170 kernels) at batches 4 and
8; more would overshoot GPT-2 at batch 1, which is device-bound (0.012 ms there)."""
BACKWARD_KERNEL_MS = 0.02
"""The same per backward kernel. H100 fit: the measured backward minus its FLOP/byte time is
6.3-6.5 ms for GPT-2 (358 kernels, 0.018 ms each) and 6.9-8.8 ms for BERT (329 kernels,
0.021-0.027 ms) at batches 1, 4 and 8: a fixed part that does not hide behind device work."""

_aten = torch.ops.aten
# The CPU flash-attention kernels (what SDPA runs on fake CPU tensors) count like the CUDA ones.
_FLOPS: dict[Any, Any] = {
    **flop_registry,
    _aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward_flop,
}
# Operators that launch no kernel although they are not views.
_NO_KERNEL = {
    _aten.empty.memory_format,
    _aten.empty_strided.default,
    _aten.empty_like.default,
    _aten._unsafe_view.default,
    _aten.detach_.default,
    _aten.lift_fresh.default,
    _aten._assert_tensor_metadata.default,
    _aten.scalar_tensor.default,
}
# Operators CUDA autocast runs in float32 (``fp32`` and ``fp32_set_opt_dtype`` in PyTorch's
# aten/src/ATen/autocast_mode.cpp) that CPU autocast leaves in the lower precision.
_CUDA_FLOAT32 = {
    getattr(_aten, name)
    for name in (
        "acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow softplus "
        "layer_norm native_layer_norm group_norm norm cosine_similarity dist pdist cdist renorm logsumexp "
        "prod softmax log_softmax cumprod cumsum sum linalg_vector_norm linalg_matrix_norm"
    ).split()
}
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_ACCUMULATE = 2**64 - 1
"""Sequence number of AccumulateGrad nodes (they run right after the node that made the gradient)."""


@dataclass
class _Trace:
    """What one forward and backward run of the graph cost, per graph node (list index)."""

    size: int
    fwd_ms: list[float] = field(init=False)
    """Device time of the node's forward operators, per-kernel costs aside."""
    fwd_kernels: list[int] = field(init=False)
    bwd_ms: list[float] = field(init=False)
    bwd_kernels: list[int] = field(init=False)
    saved_bytes: list[int] = field(init=False)
    """Bytes of the storages the node saved for backward first (each storage counts once)."""
    workspace: list[int] = field(init=False)
    """Most bytes live beyond saved storages and parameter gradients while the node ran."""
    copy_bytes: list[int] = field(init=False)
    """Bytes of the parameters' half-precision copies the node saved first."""

    def __post_init__(self) -> None:
        self.fwd_ms, self.bwd_ms = [0.0] * self.size, [0.0] * self.size
        self.fwd_kernels, self.bwd_kernels = [0] * self.size, [0] * self.size
        self.saved_bytes, self.workspace = [0] * self.size, [0] * self.size
        self.copy_bytes = [0] * self.size


class _Recorder(TorchDispatchMode):
    """Notes each operator's device time and the storages it allocates, for its graph node."""

    def __init__(
        self, trace: _Trace, device: DeviceSpec, tensors: list[torch.Tensor], leaves: list[torch.Tensor]
    ) -> None:
        super().__init__()
        self.trace, self.device = trace, device
        self.parameters = {storage_key(t.untyped_storage()) for t in tensors}
        """Parameters, buffers and constants: not activations."""
        self.allocations = AllocationLog([*tensors, *leaves])
        self.node = 0
        """The forward node now running; in backward, the node of the last operator."""
        self.backward = False
        self.sequence_starts: list[int] = []
        """First autograd sequence number of each graph node (nondecreasing)."""
        self.copies: set[int] = set()
        """Storages of parameters cast by autocast (``_to_copy`` of a parameter)."""
        self.saved_keys: set[int] = set()
        self.saved_serials: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace != "aten":  # prim.device and other metadata queries
            return out
        node = self.allocations.where = self._owner()
        if _launches(func, out):
            self._time(func, args, kwargs, out, node)
        for tensor in tensors_in(out):
            self.allocations.allocated(tensor, node)
        if func is _aten._to_copy.default and storage_key(args[0].untyped_storage()) in self.parameters:
            self.copies.add(storage_key(out.untyped_storage()))
        self.allocations.ended(node)
        return out

    def _owner(self) -> int:
        if not self.backward:
            return self.node
        sequence = running_backward_sequence_number()
        if sequence is not None and sequence != _ACCUMULATE:
            self.node = max(0, bisect.bisect_right(self.sequence_starts, sequence) - 1)
        return self.node

    def _time(self, func: Any, args: Any, kwargs: Any, out: Any, node: int) -> None:
        inputs = [*tensors_in(args), *tensors_in(kwargs)]
        moved = sum(_read_bytes(t) for t in inputs) + sum(_nbytes(t) for t in tensors_in(out))
        ms = moved / self.device.memory_bandwidth * 1e3
        counter = _FLOPS.get(overload_packet(func))
        if counter is not None:
            dtype = next((t.dtype for t in inputs if t.is_floating_point()), torch.float32)
            flops = counter(*args, **kwargs, out_val=out)
            ms = max(ms, flops / self.device.matmul_flops(str(dtype).removeprefix("torch.")) * 1e3)
        if self.backward:
            self.trace.bwd_ms[node] += ms
            self.trace.bwd_kernels[node] += 1
        else:
            self.trace.fwd_ms[node] += ms
            self.trace.fwd_kernels[node] += 1

    def saved(self, tensor: torch.Tensor) -> torch.Tensor:
        """``saved_tensors_hooks`` pack hook: a storage counts as an activation of the first node
        that saves it (a stage holds it once, however many of its nodes save it)."""
        storage = tensor.untyped_storage()
        if storage_key(storage) not in self.parameters and storage_key(storage) not in self.saved_keys:
            self.saved_keys.add(storage_key(storage))
            self.saved_serials.add(self.allocations.serial_of(tensor))
            if storage_key(storage) in self.copies:
                self.trace.copy_bytes[self.node] += storage.nbytes()
            else:
                self.trace.saved_bytes[self.node] += storage.nbytes()
        return tensor


def _launches(func: Any, out: Any) -> bool:
    """Whether the operator runs a kernel: not for views, allocations or empty outputs."""
    if func.is_view or func in _NO_KERNEL:
        return False
    outputs = list(tensors_in(out))
    return not outputs or any(t.numel() for t in outputs)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _read_bytes(tensor: torch.Tensor) -> int:
    # An expanded input is read from its storage, not once per element of the view.
    return min(_nbytes(tensor), tensor.untyped_storage().nbytes())


class _Interpreter(fx.Interpreter):
    """Runs the graph, telling the recorder which node runs; optionally with CUDA's autocast
    policy on fake CPU tensors."""

    def __init__(self, graph: StepGraph, recorder: _Recorder, cuda_autocast: bool) -> None:
        super().__init__(graph.graph_module)
        self.recorder, self.cuda_autocast = recorder, cuda_autocast
        self.index = {n: i for i, n in enumerate(graph.nodes)}

    def run_node(self, node: fx.Node) -> Any:
        if node in self.index:
            self.recorder.node = self.index[node]
            self.recorder.sequence_starts.append(autograd_sequence_number())
        return super().run_node(node)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if self.cuda_autocast and overload_packet(target) in _CUDA_FLOAT32:
            args, kwargs = _to_float32(args), _to_float32(kwargs)
        return super().call_function(target, args, kwargs)


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in _LOW_PRECISION else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_float32(v) for k, v in value.items()}
    return value


def _trace(graph: StepGraph, fake_leaves: Sequence[torch.Tensor], device: DeviceSpec) -> _Trace:
    """Run the step forward and backward once on fake tensors, noting costs per node."""
    inputs = iter(fake_leaves)
    args = [
        graph.tensors[graph.tensor_of[n]] if n in graph.tensor_of else next(inputs)
        for n in graph.graph_module.graph.nodes
        if n.op == "placeholder"
    ]
    tensors = list(graph.tensors.values())
    trace = _Trace(len(graph.nodes))
    recorder = _Recorder(trace, device, tensors, list(fake_leaves))
    # The fake tensors live on the CPU, but a GPU will run the step: follow CUDA's autocast policy.
    cuda_autocast = (
        device.name != "cpu" and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in _LOW_PRECISION
    )
    grads_before = [t.grad for t in tensors]
    try:
        with torch.enable_grad(), recorder:
            with torch.autograd.graph.saved_tensors_hooks(recorder.saved, lambda t: t):
                outputs = _Interpreter(graph, recorder, cuda_autocast).run(*args)
            loss = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
            del outputs
            recorder.backward = True
            if isinstance(loss, torch.Tensor) and loss.requires_grad:
                torch.autograd.backward(loss)
            del loss
        grad_serials = {recorder.allocations.serial_of(t.grad) for t in tensors if t.grad is not None}
    finally:
        for tensor, grad in zip(tensors, grads_before):
            tensor.grad = grad
        recorder.allocations.close()
    # The most bytes live at once per node, saved storages and parameter gradients aside (the
    # memory model counts those on their own).
    excluded = recorder.saved_serials | grad_serials
    trace.workspace = most_live(recorder.allocations.events, excluded, trace.size)
    return trace


def estimate_blocks(
    graph: StepGraph,
    fake_leaves: Sequence[torch.Tensor],
    spans: Sequence[tuple[int, int]],
    device: DeviceSpec | None = None,
) -> list[BlockCost]:
    """Analytic ``BlockCost`` of each block ``(start, end)`` on ``device`` (default: the ``cpu``
    preset, whose numbers only give relative costs).

    ``graph.tensors`` and the leaves must be fake tensors of one fake mode (see
    ``fake_module_state``). For mixed precision, call it inside the ``torch.autocast`` the step
    runs in; on fake CPU tensors, with a GPU ``device``, operators follow CUDA's autocast policy.
    """
    device = device or get_device("cpu")
    trace = _trace(graph, fake_leaves, device)
    cut_bytes = graph.cut_bytes()
    host = [device.op_overhead_ms * sum(1 for i in range(a, b) if trace.fwd_kernels[i]) for a, b in spans]
    variable = [sum(trace.fwd_ms[a:b]) for a, b in spans]
    device_ms = [KERNEL_MS * sum(trace.fwd_kernels[a:b]) + v for (a, b), v in zip(spans, variable)]
    forward = _forward_ms(host, device_ms)
    return [
        _block(graph, trace, a, b, cut_bytes[b], fwd_ms, fwd_ms - v)
        for (a, b), fwd_ms, v in zip(spans, forward, variable)
    ]


def _forward_ms(host: list[float], device: list[float]) -> list[float]:
    """Forward time of each block when the host launches them all in a row.

    Kernels run asynchronously: the whole forward takes the longer of host and device time.
    When the host is slower, the device waits for the blocks that launch more than they
    compute; each gets a share of the wait in proportion to its excess (never more than it).
    """
    waiting = sum(host) - sum(device)
    if waiting <= 0:
        return device
    excess = [max(0.0, h - d) for h, d in zip(host, device)]
    share = waiting / sum(excess)  # sum(excess) >= waiting > 0
    return [d + share * e for d, e in zip(device, excess)]


def _block(
    graph: StepGraph, trace: _Trace, start: int, end: int, cut_bytes: int, fwd_ms: float, fwd_fixed_ms: float
) -> BlockCost:
    bwd_fixed_ms = BACKWARD_KERNEL_MS * sum(trace.bwd_kernels[start:end])
    return BlockCost(
        start=start,
        end=end,
        fwd_ms=fwd_ms,
        bwd_ms=bwd_fixed_ms + sum(trace.bwd_ms[start:end]),
        activation_bytes=sum(trace.saved_bytes[start:end]),
        cut_bytes=cut_bytes,
        tensor_names=tuple(graph.tensor_names(start, end)),
        module_paths=tuple(dict.fromkeys(graph.module_path(i) for i in range(start, end))),
        # Only the device's FLOPs and bytes grow with the micro-batch: extrapolated from this
        # size, per-kernel costs and any wait for the host stay as they are.
        fwd_fixed_ms=fwd_fixed_ms,
        bwd_fixed_ms=bwd_fixed_ms,
        workspace_bytes=max(trace.workspace[start:end], default=0),
        weight_copy_bytes=sum(trace.copy_bytes[start:end]),
    )
