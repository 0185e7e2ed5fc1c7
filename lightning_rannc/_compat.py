"""Every private torch/Lightning name and every version difference the package relies on.

Each shim is a named function or flag with one line saying what it stands for, in the style
of Lightning's ``lightning/fabric/utilities/imports.py`` and torchgpipe's ``stream.py``. When a
torch or Lightning upgrade breaks one of them, the failure names the shim here, and nothing
else in the package needs to change. ``tests/unit/test_compat.py`` fails when a ``_``-prefixed
attribute of torch or lightning is used anywhere else in the package.

Helpers in this module are implementation details and stay private to the package.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from lightning.fabric.utilities.distributed import _all_gather_ddp_if_available as all_gather_ddp_if_available
from lightning.fabric.utilities.distributed import _distributed_is_initialized as distributed_is_initialized
from lightning.fabric.utilities.distributed import (
    _get_default_process_group_backend_for_device as default_process_group_backend,
)
from lightning.fabric.utilities.distributed import _init_dist_connection
from lightning.fabric.utilities.distributed import _sync_ddp_if_available as sync_ddp_if_available
from lightning.fabric.utilities.load import _METADATA_FILENAME as LIGHTNING_METADATA_FILENAME
from lightning.fabric.utilities.load import _load_distributed_checkpoint as load_distributed_checkpoint
from lightning.fabric.utilities.optimizer import _optimizers_to_device as optimizers_to_device
from lightning_utilities.core.imports import compare_version
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe, ScheduleLoopedBFS
from torch.distributed.pipelining.schedules import _Action, _ComputationType
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map, tree_map_only, tree_unflatten

# Lightning warns on `trainer.init_module()` with any strategy that overrides
# `model_sharded_context` that it "cannot fully support proper instantiation" there; this one
# overrides it to build `configure_model` on the meta device, and supports both.
warnings.filterwarnings(
    "ignore",
    message=r"`trainer.init_module` cannot fully support proper instantiation of your model with the `RaNNCStrategy`",
)

# Re-exported under public names:
# - Lightning's process-group helpers, as its own DDP strategy uses them;
# - Lightning's sharded checkpoint layout (a DCP directory plus its metadata file), so that its
#   `consolidate_checkpoint` and `Trainer(ckpt_path=...)` read ours;
# - fake tensors (shapes and dtypes without memory: captures on the meta device, of freed stages);
# - pytrees (torch has no public pytree module; Lightning and torch.export use this one too);
# - the dispatch mode that intercepts every ATen call below autograd (the analytic cost model).
__all__ = [
    "LIGHTNING_METADATA_FILENAME",
    "FakeTensorMode",
    "TorchDispatchMode",
    "TreeSpec",
    "all_gather_ddp_if_available",
    "default_process_group_backend",
    "distributed_is_initialized",
    "start_process_group",
    "load_distributed_checkpoint",
    "optimizers_to_device",
    "sync_ddp_if_available",
    "tree_flatten",
    "tree_map",
    "tree_unflatten",
    # defined below
    "DDP_TAKES_FORWARD_SYNC_BUFFERS",
    "SCHEDULE_STEP_TAKES_RETURN_OUTPUTS",
    "TORCH_GREATER_EQUAL_2_13",
    "PipelineStageClass",
    "forward_only_schedule",
    "move_to_device",
    "attached_trainer",
    "autograd_sequence_number",
    "is_fake",
    "thread_frame",
    "build_launcher",
    "ddp_without_buffer_sync",
    "is_op_overload",
    "is_registered_pytree",
    "op_schema",
    "optimizer_of",
    "overload_packet",
    "replaced_schedule_p2p",
    "schedule_p2p_helpers",
    "rendezvous_store",
    "running_backward_sequence_number",
    "scaler_found_inf",
    "storage_key",
    "training_data_source",
    "scheduler_last_values",
    "optimizer_unscales_itself",
    "abort_process_group",
    "scaler_unscaled",
    "set_scheduler_last_values",
]

TORCH_GREATER_EQUAL_2_13 = compare_version("torch", lambda a, b: a >= b, "2.13.0", use_base_version=True)
"""torch 2.13 rewrote ``PipelineStage``'s metadata: receive buffers get ``requires_grad`` only
where the value has a gradient, and stage inputs/outputs are validated only in debug mode."""

SCHEDULE_STEP_TAKES_RETURN_OUTPUTS = "return_outputs" in inspect.signature(ScheduleGPipe.step).parameters
"""``schedule.step(return_outputs=False)`` (torch 2.13+) skips merging the last stage's outputs."""

DDP_TAKES_FORWARD_SYNC_BUFFERS = (
    "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
)
"""torch 2.13 renamed DDP's ``broadcast_buffers`` (deprecated there) to ``forward_sync_buffers``."""


def ddp_without_buffer_sync() -> dict[str, Any]:
    """DDP keyword arguments that turn off its buffer broadcast in forward, in this torch's spelling."""
    return {"forward_sync_buffers": False} if DDP_TAKES_FORWARD_SYNC_BUFFERS else {"broadcast_buffers": False}


class _Torch211Stage(PipelineStage):
    """torch < 2.13: ``PipelineStage`` behaving as 2.13's does in two respects.

    1. Integer and boolean values (token ids, labels, masks) may cross a stage boundary.
       torch 2.11 calls ``requires_grad_(True)`` on every receive buffer ("only Tensors of
       floating point dtype can require gradients"), then sends a gradient back for every
       received value and waits for one for every value sent. The overrides call torch's own
       methods and only drop what concerns values that cannot have a gradient, so both
       neighbours agree.
    2. Stage inputs and outputs are checked for shape and dtype, not strides. torch 2.11 wants
       each tensor's exact strides, which differ for the same contiguous memory wherever a
       dimension has size 1 (a micro-batch of one sample), and for the user's own views
       (``logits[:, -1]`` returned by the last stage). 2.13 checks nothing outside debug mode;
       what crosses a boundary is made contiguous before it is sent (``capture/split.py``).
    3. Two neighbouring stages on one rank (ZB-V's turn) are not "connected" at the first step.
       torch 2.11 sends a probe to each neighbour's rank, here its own, which gloo refuses ("Pair
       is not connected"); its runtime hands such neighbours their values without sending.
    4. The example inputs and outputs are kept as metadata. torch 2.11 keeps the tensors given
       as ``input_args`` and ``output_args`` themselves (``inputs_meta``, ``outputs_meta``) for
       the stage's life: a micro-batch's inputs and outputs on the device, all through training,
       which no plan counts (``benchmarks/memory.py`` found them live at every step's peak). It
       reads only their shapes and dtypes, making each receive buffer on the stage's device, so
       meta copies serve; 2.13 keeps metadata only.
    """

    def __init__(
        self,
        submodule: torch.nn.Module,
        stage_index: int,
        num_stages: int,
        device: torch.device,
        input_args: Any = None,
        output_args: Any = None,
        **kwargs: Any,
    ) -> None:
        examples = {"input_args": _on_meta(input_args), "output_args": _on_meta(output_args)}
        super().__init__(submodule, stage_index, num_stages, device, **examples, **kwargs)

    def _get_init_p2p_neighbors_ops(self) -> list[dist.P2POp]:
        return [op for op in super()._get_init_p2p_neighbors_ops() if op.group_peer != self.group_rank]

    def set_local_fwd_input(self, prev_stage_outputs: Any, mb_index: int) -> None:
        # As 1. for values handed over at the V's turn: requires_grad where a gradient can be.
        values = prev_stage_outputs if isinstance(prev_stage_outputs, (tuple, list)) else (prev_stage_outputs,)
        for info, value in zip(self.args_recv_info[mb_index], values, strict=True):
            info.buffer = value.detach().requires_grad_(not _has_no_grad(value))

    def set_local_bwd_input(self, next_stage_bwd_outputs: Any, mb_index: int) -> None:
        # ... and their gradients handed back: none for an integer value (torch 2.11 wants a tensor).
        for info, grad in zip(self.grad_recv_info[mb_index], next_stage_bwd_outputs, strict=True):
            info.buffer = grad

    # The signatures are torch 2.11's, which type checkers (reading the installed torch) may not know.
    def _prepare_forward_infra(self, num_microbatches: int, args: Any, kwargs: Any = None) -> Any:  # type: ignore[override]
        # With has_backward off, torch leaves requires_grad to us: set it on floating buffers only.
        has_backward, self.has_backward = self.has_backward, False
        try:
            outputs = super()._prepare_forward_infra(num_microbatches, args, kwargs)
        finally:
            self.has_backward = has_backward
        if has_backward:
            for infos in self.args_recv_info.values():
                for info in infos:
                    buffer = getattr(info, "buffer", None)
                    if isinstance(buffer, torch.Tensor) and not _has_no_grad(buffer):
                        buffer.requires_grad_(True)
        return outputs

    def _create_grad_send_info(self, args_recv_info: tuple[Any, ...]) -> list[int | None]:
        # No gradient goes back for a received integer value ...
        destinations = super()._create_grad_send_info(args_recv_info)
        buffers = [getattr(info, "buffer", None) for info in args_recv_info]
        return [None if _has_no_grad(b) else d for d, b in zip(destinations, buffers, strict=True)]

    def get_bwd_recv_ops(self, bwd_chunk_id: int) -> list[Any]:
        # ... and none is awaited for a sent one (its buffer stays unused: backward skips the value).
        return [op for op in super().get_bwd_recv_ops(bwd_chunk_id) if not _has_no_grad(op.tensor)]

    def get_bwd_send_ops(self, bwd_chunk_id: int) -> list[Any]:
        # A received floating value that the loss does not depend on (a value only logged, or
        # detached) has no gradient; the previous stage waits for one all the same: send zeros.
        grads = self.bwd_cache.get(bwd_chunk_id)
        if self.has_backward and not self.is_first and grads is not None:
            buffers = [getattr(info, "buffer", None) for info in self.args_recv_info[bwd_chunk_id]]
            self.bwd_cache[bwd_chunk_id] = tuple(
                torch.zeros_like(b) if g is None and isinstance(b, torch.Tensor) and not _has_no_grad(b) else g
                for g, b in zip(grads, buffers, strict=True)
            )
        return super().get_bwd_send_ops(bwd_chunk_id)

    def backward_maybe_with_nosync(self, backward_type: str, bwd_kwargs: dict[str, Any], *args: Any, **kw: Any) -> Any:
        # Zero bubble's input-gradient pass differentiates every output: leave out those that
        # carry no gradient (integer values passed on), as the full backward does itself.
        grads = bwd_kwargs.get("output_grads")
        if backward_type == "input" and grads is not None and not isinstance(bwd_kwargs["stage_output"], torch.Tensor):
            pairs = [(out, grad) for out, grad in zip(bwd_kwargs["stage_output"], grads) if out.requires_grad]
            bwd_kwargs = {
                **bwd_kwargs,
                "stage_output": tuple(p[0] for p in pairs),
                "output_grads": [p[1] for p in pairs],
            }
        return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, *args, **kw)

    def backward_one_chunk(self, bwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        # Zero bubble's input-gradient pass returns gradients only for the inputs that require
        # them; the sends pair gradients with received values by position: put them back there.
        result = super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)
        grads = self.bwd_cache.get(bwd_chunk_id)
        if self.is_first or grads is None:
            return result
        buffers = [getattr(info, "buffer", None) for info in self.args_recv_info[bwd_chunk_id]]
        if len(grads) != len(buffers):
            wanted = [i for i, b in enumerate(buffers) if isinstance(b, torch.Tensor) and b.requires_grad]
            placed: list[Any] = [None] * len(buffers)
            for position, grad in zip(wanted, grads, strict=True):
                placed[position] = grad
            self.bwd_cache[bwd_chunk_id] = tuple(placed)
        return result

    def _validate_fwd_input(self, args: Any, kwargs: Any) -> None:
        if self.is_first and not kwargs:
            expected = [getattr(info, "meta", None) for info in self.args_recv_info[0]]
            _check_shapes_and_dtypes(f"Stage {self.stage_index} forward inputs", expected, list(args))

    def _validate_fwd_outputs(self, outputs: tuple[torch.Tensor, ...]) -> None:
        _check_shapes_and_dtypes(f"Stage {self.stage_index} forward outputs", self.get_outputs_meta(), outputs)  # type: ignore[attr-defined]


def _check_shapes_and_dtypes(what: str, expected: Any, given: Any) -> None:
    if len(expected) != len(given):
        raise RuntimeError(f"{what}: {len(given)} values, expected {len(expected)}")
    for index, (meta, value) in enumerate(zip(expected, given)):
        if isinstance(meta, torch.Tensor) and (meta.shape, meta.dtype) != (value.shape, value.dtype):
            raise RuntimeError(
                f"{what}: value {index} is {tuple(value.shape)} {value.dtype}, "
                f"expected {tuple(meta.shape)} {meta.dtype}"
            )


def _on_meta(examples: Any) -> Any:
    """Meta tensors of the examples' shapes, dtypes and ``requires_grad``, in the same structure."""
    return tree_map_only(
        torch.Tensor,
        lambda t: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad),
        examples,
    )


def _has_no_grad(buffer: Any) -> bool:
    return isinstance(buffer, torch.Tensor) and not (buffer.is_floating_point() or buffer.is_complex())


class _ReceiveBuffersOnDemand:
    """Receive buffers that hold memory only from their receive to the backward that uses them.

    torch allocates a receive buffer for every micro-batch's inputs and another for its
    outputs' gradients when a schedule first runs, and keeps all of them across steps: ``M``
    times the stage's inputs and outputs per device (``_prepare_forward_infra``,
    ``_prepare_backward_infra``). Only the micro-batches in flight need theirs: 47 GiB of a
    GPT-3-shaped stage's 96 GiB with 96 micro-batches, where 1F1B keeps at most 64 in flight.
    Here each buffer's storage is emptied once torch has made them (``untyped_storage().resize_(0)``,
    as FSDP frees parameters: the tensor objects torch keeps stay the same), grown back just
    before its receive is posted, and emptied again when the micro-batch's backward is complete
    (after the weight pass with zero bubble, which keeps the output gradients until then).

    Only the buffers torch made are touched: a value handed over between two stages of one
    rank replaces the buffer with the sender's tensor (``set_local_fwd_input``). A buffer a
    stage returns, or a view of it, is never emptied again: whoever holds the output reads it
    after the backward (torch's output merge; the runtime's logged values and metric
    arguments, such as ``batch["targets"][:, -1]`` received by the last stage). An input
    gradient that is a received gradient (a value passed on untouched, such as the residual
    stream past a stage cut inside attention) is copied before its buffer is emptied. The
    storages are freed on the compute stream after the receive was waited on, and NCCL
    records its streams on the tensors it receives into, so the allocator does not reuse them
    early. Forward-only pipelines (evaluation) keep torch's buffers as they are.
    """

    def _prepare_forward_infra(self, *args: Any, **kwargs: Any) -> Any:
        result = super()._prepare_forward_infra(*args, **kwargs)  # type: ignore[misc]
        if self.has_backward:  # type: ignore[attr-defined]
            self._own_buffers(self.args_recv_info)  # type: ignore[attr-defined]
        return result

    def _prepare_backward_infra(self, *args: Any, **kwargs: Any) -> Any:
        result = super()._prepare_backward_infra(*args, **kwargs)  # type: ignore[misc]
        self._own_buffers(self.grad_recv_info)  # type: ignore[attr-defined]
        return result

    def get_fwd_recv_ops(self, fwd_chunk_id: int) -> list[Any]:
        self._hold(self.args_recv_info.get(fwd_chunk_id, ()))  # type: ignore[attr-defined]
        return super().get_fwd_recv_ops(fwd_chunk_id)  # type: ignore[misc]

    def get_bwd_recv_ops(self, bwd_chunk_id: int) -> list[Any]:
        self._hold(self.grad_recv_info.get(bwd_chunk_id, ()))  # type: ignore[attr-defined]
        return super().get_bwd_recv_ops(bwd_chunk_id)  # type: ignore[misc]

    def forward_one_chunk(self, fwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        output = super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)  # type: ignore[misc]
        returned = {t.untyped_storage().data_ptr() for t in _tensors(output)} - {0}
        pinned = self.__dict__.setdefault("_rannc_pinned_buffers", set())
        for buffer in _buffers(self.args_recv_info.get(fwd_chunk_id, ())):  # type: ignore[attr-defined]
            if buffer.untyped_storage().data_ptr() in returned:
                pinned.add(id(buffer))
        return output

    def backward_one_chunk(self, bwd_chunk_id: int, loss: Any = None, full_backward: bool = True, **kw: Any) -> Any:
        result = super().backward_one_chunk(bwd_chunk_id, loss, full_backward, **kw)  # type: ignore[misc]
        self._copy_received_input_grads(bwd_chunk_id)
        if full_backward:
            self._release_chunk(bwd_chunk_id)
        return result

    def _copy_received_input_grads(self, chunk: int) -> None:
        """Give an input gradient that is a received gradient memory of its own.

        A value the stage passes on untouched has the gradient received for it as its input
        gradient (zero bubble's input pass, ``autograd.grad``, returns it as is), which is sent
        on, or handed to the stage before on this rank, after the buffer is emptied: there the
        backward read freed memory. A copy, not a pinned buffer: that would hold the value's
        gradient for every micro-batch all through training."""
        grads = self.bwd_cache.get(chunk)  # type: ignore[attr-defined]
        buffers = _buffers(self.grad_recv_info.get(chunk, ()))  # type: ignore[attr-defined]
        received = {b.untyped_storage().data_ptr() for b in buffers} - {0}
        if not grads or not received:
            return
        shared = [isinstance(g, torch.Tensor) and g.untyped_storage().data_ptr() in received for g in grads]
        if any(shared):
            self.bwd_cache[chunk] = tuple(g.clone() if copy else g for g, copy in zip(grads, shared))  # type: ignore[attr-defined]

    def backward_weight_one_chunk(self, bwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        result = super().backward_weight_one_chunk(bwd_chunk_id, *args, **kwargs)  # type: ignore[misc]
        self._release_chunk(bwd_chunk_id)
        return result

    def _own_buffers(self, infos_by_chunk: dict[int, Any]) -> None:
        owned = self.__dict__.setdefault("_rannc_owned_buffers", {})
        for infos in infos_by_chunk.values():
            for buffer in _buffers(infos):
                owned[id(buffer)] = (buffer, buffer.untyped_storage().nbytes())
                buffer.untyped_storage().resize_(0)

    def _hold(self, infos: Any) -> None:
        owned = self.__dict__.get("_rannc_owned_buffers", {})
        for buffer in _buffers(infos):
            mine = owned.get(id(buffer))
            if mine is not None and mine[0] is buffer and buffer.untyped_storage().nbytes() == 0:
                buffer.untyped_storage().resize_(mine[1])

    def _release_chunk(self, chunk: int) -> None:
        owned = self.__dict__.get("_rannc_owned_buffers", {})
        pinned = self.__dict__.get("_rannc_pinned_buffers", set())
        infos = (*self.args_recv_info.get(chunk, ()), *self.grad_recv_info.get(chunk, ()))  # type: ignore[attr-defined]
        for buffer in _buffers(infos):
            mine = owned.get(id(buffer))
            if mine is not None and mine[0] is buffer and id(buffer) not in pinned:
                buffer.untyped_storage().resize_(0)


def _buffers(infos: Any) -> list[torch.Tensor]:
    """The receive buffers of a chunk's ``_RecvInfo`` entries (root arguments have none)."""
    buffers = (getattr(info, "buffer", None) for info in infos)
    return [b for b in buffers if isinstance(b, torch.Tensor)]


def _tensors(values: Any) -> list[torch.Tensor]:
    return [v for v in tree_flatten(values)[0] if isinstance(v, torch.Tensor)]


class _ContiguousInputGradients:
    """Input gradients are sent contiguous, as the stage outputs are (``capture/split.py``).

    torch sends a stage's input gradients as autograd returns them (``get_bwd_send_ops``), and
    autograd returns a view where the stage begins with one: the gradient of a value the stage
    first transposes (a cut before attention's ``transpose``) is the transposed gradient. gloo
    ("input tensor has to be contiguous") and NCCL refuse to send a non-contiguous tensor."""

    def backward_one_chunk(self, bwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        result = super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)  # type: ignore[misc]
        grads = self.bwd_cache.get(bwd_chunk_id)  # type: ignore[attr-defined]
        if grads is not None and any(isinstance(g, torch.Tensor) and not g.is_contiguous() for g in grads):
            contiguous = tuple(g.contiguous() if isinstance(g, torch.Tensor) else g for g in grads)
            self.bwd_cache[bwd_chunk_id] = contiguous  # type: ignore[attr-defined]
        return result


class _RecomputeOnceInWeightPass:
    """Zero bubble's weight pass recomputes each checkpoint region once, not once a parameter group.

    torch's weight pass (``stage_backward_weight``) calls ``autograd.grad`` once per parameter
    group (a module's weight and bias), and non-reentrant checkpointing recomputes a region anew
    in every backward call that reaches it: counted on torch 2.13, a stage of per-layer regions
    of 6 groups recomputed each layer 6 times in its weight pass, one region of 12 groups 12
    times; forced zero bubble with recomputation measured 0.52-0.63 of its prediction on the
    2-core CPU. ``torch.utils.checkpoint.GraphExecGroup`` makes the calls inside it share one
    recomputation; it requires calls that use no saved value twice, which the weight pass's
    groups already are (each call frees the part of the graph it ran)."""

    def backward_weight_one_chunk(self, bwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        with torch.utils.checkpoint.GraphExecGroup():
            return super().backward_weight_one_chunk(bwd_chunk_id, *args, **kwargs)  # type: ignore[misc]


PipelineStageClass: type[PipelineStage] = type(
    "RaNNCPipelineStage",
    (
        _RecomputeOnceInWeightPass,
        _ReceiveBuffersOnDemand,  # after the gradients are made contiguous (a copy shares no buffer)
        _ContiguousInputGradients,
        PipelineStage if TORCH_GREATER_EQUAL_2_13 else _Torch211Stage,
    ),
    {},
)
"""The ``PipelineStage`` to build: torch's own (on torch < 2.13 the one above) with receive
buffers that hold memory only while a micro-batch needs them, input gradients sent contiguous,
and a zero-bubble weight pass that recomputes each checkpoint region once."""


def forward_only_schedule(
    stages: list[PipelineStage], n_microbatches: int, positions: dict[int, int], **options: Any
) -> Any:
    """Forwards only, for stages placed by ``positions`` (stage index -> pipeline position):
    each rank runs its stages in order, every micro-batch of one before the next (a fill and
    drain, as ``ScheduleLoopedBFS``). torch has no evaluation schedule for a V placement (ZB-V's
    own order interleaves backwards) and ``ScheduleLoopedBFS`` places stages round-robin; its
    runtime takes the placement from the actions (``_validate_and_set_stage_mapping``), so only
    the actions are ours. torch checks that every forward has a backward, so the order has them,
    and drops them again once lowered: its runtime runs a schedule's backwards in ``eval`` too,
    and where two stages of a rank are neighbours (the V's turn) hands their gradients over,
    which a stage without backward refuses. ``_Action``, ``_calculate_single_rank_operations``
    and ``_prepare_schedule_with_comms`` are private."""
    backward_kinds = {_ComputationType.FULL_BACKWARD, _ComputationType.SEND_B, _ComputationType.RECV_B}

    class _PlacedForwards(ScheduleLoopedBFS):
        def _calculate_single_rank_operations(self, rank: int) -> list[Any]:
            own = sorted(stage for stage, position in positions.items() if position == rank)
            microbatches = range(self._n_microbatches)
            forwards = [_Action(s, _ComputationType.FORWARD, m) for s in own for m in microbatches]
            backward = _ComputationType.FULL_BACKWARD
            return forwards + [_Action(s, backward, m) for s in reversed(own) for m in reversed(microbatches)]

        def _prepare_schedule_with_comms(self, actions: Any, format: Any = "compute_only") -> None:
            super()._prepare_schedule_with_comms(actions, format)
            self.pipeline_order_with_comms = {
                rank: [a for a in lowered if a.computation_type not in backward_kinds]
                for rank, lowered in self.pipeline_order_with_comms.items()
            }

    return _PlacedForwards(list[Any](stages), n_microbatches=n_microbatches, **options)


# --- torch internals --------------------------------------------------------------------------


def is_registered_pytree(kind: type) -> bool:
    """Whether torch's pytrees open instances of ``kind`` (no public query exists)."""
    return kind in torch.utils._pytree.SUPPORTED_NODES


def op_schema(target: Any) -> Any:
    """The schema of an ATen operator overload (argument names, which ones it writes), or ``None``."""
    return getattr(target, "_schema", None)


def overload_packet(target: Any) -> Any:
    """The operator an overload belongs to (``aten.mm`` for ``aten.mm.default``), or ``None``."""
    return getattr(target, "_overloadpacket", None)


def is_op_overload(target: Any) -> bool:
    """Whether an fx node's target is an ATen operator overload."""
    return isinstance(target, torch._ops.OpOverload)


def thread_frame(thread: int) -> Any:
    """The frame a thread (``threading.get_ident()``) runs now, or ``None`` once it ended;
    ``sys._current_frames`` is CPython's documented way (what ``faulthandler`` shows)."""
    import sys

    return sys._current_frames().get(thread)


def is_fake(tensor: Any) -> bool:
    """Whether ``tensor`` is a fake tensor (shapes and dtypes, no memory)."""
    return isinstance(tensor, FakeTensor)


def storage_key(storage: Any) -> int:
    """An identity for a tensor storage, the same for every tensor viewing it (fake ones too)."""
    return int(storage._cdata)


def autograd_sequence_number() -> int:
    """The sequence number the next autograd node will get: nodes made by one forward op are
    numbered from here, and backward runs a node under the number its forward op had."""
    return int(torch._C._autograd._get_sequence_nr())


def running_backward_sequence_number() -> int | None:
    """The sequence number of the autograd node running now (in backward), or ``None``."""
    node = torch._C._current_autograd_node()
    return None if node is None else int(node._sequence_nr())


def move_to_device(module: Any, device: Any) -> None:
    """``module.to(device)`` for every parameter and buffer but the meta ones (each rank
    materialises only its stages'), which ``.to()`` would refuse (``nn.Module._apply``). Then,
    as ``.to()`` does, Lightning's modules report ``device``: without it a step's
    ``torch.arange(n, device=self.device)`` stays on the CPU the module was built on, and a
    Python number logged with ``sync_dist`` becomes a CPU tensor handed to NCCL. Lightning keeps
    it in a private ``_device``, set on every module that has one (lightning and
    pytorch_lightning each have their own mixin class)."""
    module._apply(lambda t: t if t.is_meta else t.to(device))
    for submodule in module.modules():
        if "_device" in vars(submodule):
            submodule._device = torch.device(device)


_P2P_HELPERS = ("_batch_p2p", "_wait_batch_p2p")


def schedule_p2p_helpers(schedule: Any) -> tuple[Any, Any] | None:
    """The functions a schedule posts (``_batch_p2p``) and waits for (``_wait_batch_p2p``) its
    sends and receives with: module-level helpers of ``torch.distributed.pipelining.schedules``
    (2.11-2.14), found through the globals ``_step_microbatches`` runs with. ``None`` when
    torch's schedules differ; the runtime trace then has no send/recv events."""
    helpers = getattr(getattr(type(schedule), "_step_microbatches", None), "__globals__", None)
    if helpers is None or not all(callable(helpers.get(name)) for name in _P2P_HELPERS):
        return None
    return helpers["_batch_p2p"], helpers["_wait_batch_p2p"]


@contextlib.contextmanager
def replaced_schedule_p2p(schedule: Any, batch_p2p: Any, wait_batch_p2p: Any) -> Iterator[None]:
    """Swap the schedule module's p2p helpers for the duration of one step (found as above)."""
    helpers = type(schedule)._step_microbatches.__globals__
    saved = {name: helpers[name] for name in _P2P_HELPERS}
    helpers.update(_batch_p2p=batch_p2p, _wait_batch_p2p=wait_batch_p2p)
    try:
        yield
    finally:
        helpers.update(saved)


# --- Lightning internals ----------------------------------------------------------------------


def attached_trainer(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or ``None`` (the public ``trainer``
    property raises when there is none)."""
    return getattr(module, "_trainer", None)


def scheduler_last_values(scheduler: Any) -> list[Any] | None:
    """What ``scheduler.get_last_lr()`` returns (torch keeps it as ``_last_lr``), or ``None``."""
    values = getattr(scheduler, "_last_lr", None)
    return values if isinstance(values, list) else None


def set_scheduler_last_values(scheduler: Any, values: list[Any]) -> None:
    scheduler._last_lr = values


def optimizer_of(optimizer: Any) -> Any:
    """The torch optimizer behind a ``LightningOptimizer`` (or the optimizer itself)."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def build_launcher(strategy: Any, lightning_package: str, start_method: str) -> Any:
    """Lightning's launcher for ``start_method``: ``"popen"`` re-runs the script per rank (as
    ``ddp`` does), the others spawn. The launchers are private to Lightning; its DDP strategy
    builds them the same way."""
    launchers = importlib.import_module(f"{lightning_package}.strategies.launchers")
    if start_method == "popen":
        return launchers._SubprocessScriptLauncher(
            strategy.cluster_environment, strategy.num_processes, strategy.num_nodes
        )
    return launchers._MultiProcessingLauncher(strategy, start_method=start_method)


def rendezvous_store() -> Any:
    """The store every rank of the default process group shares (it has no public accessor)."""
    return torch.distributed.distributed_c10d._get_default_store()


def training_data_source(trainer: Any) -> Any:
    """The fit loop's source of training data loaders, before Lightning sets them up (no public
    accessor exists at ``setup`` time)."""
    return trainer.fit_loop._data_source


def pretrained_init(model: Any) -> Any:
    """transformers' initialisation of one module of ``model`` (a ``PreTrainedModel``), as a call
    taking the module: ``_init_weights`` is the only per-module entry point (``initialize_weights``
    walks the whole model, which exists only in part on a rank)."""
    return model._init_weights


def evaluation_data_source(trainer: Any) -> Any:
    """The running evaluation loop's source of data loaders (``validate``, ``test`` or ``predict``
    on a Trainer that did not ``fit``), before Lightning sets them up."""
    loops = {"validate": trainer.validate_loop, "test": trainer.test_loop, "predict": trainer.predict_loop}
    return loops[trainer.state.fn.value if hasattr(trainer.state.fn, "value") else trainer.state.fn]._data_source


def start_process_group(environment: Any, backend: str, timeout_s: float, device: torch.device) -> None:
    """Lightning's process-group start (it reads the cluster environment), bound to ``device``
    on a GPU as Lightning's DDPStrategy does: NCCL then creates communicators on the right GPU
    instead of guessing it from the rank."""
    device_id = device if device.type == "cuda" else None
    _init_dist_connection(environment, backend, timeout=datetime.timedelta(seconds=timeout_s), device_id=device_id)


def abort_process_group(group: Any) -> None:
    """Abort an NCCL process group (``None``: all of them) without waiting for its peers; torch's
    abort is still private (experimental). Where it is missing, destroy instead."""
    from torch.distributed import distributed_c10d

    abort = getattr(distributed_c10d, "_abort_process_group", None)
    if abort is None:
        dist.destroy_process_group(group)
    else:
        abort(group)


def optimizer_unscales_itself(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` unscales gradients itself (fused Adam/AdamW): Lightning then never
    calls ``GradScaler.unscale_`` for it (its check reads the same private flag)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def scaler_unscaled(scaler: Any, optimizer: Any) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` ran since the last ``update()`` (private state)."""
    state = scaler._per_optimizer_states.get(id(optimizer))
    return bool(state) and state["stage"].name == "UNSCALED"


def scaler_found_inf(scaler: Any, optimizer: Any) -> dict[Any, Any]:
    """``GradScaler``'s per-device "found inf" flags of ``optimizer`` after ``unscale_`` (kept in
    a private dict; no public hook exists)."""
    return scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]  # type: ignore[no-any-return]
