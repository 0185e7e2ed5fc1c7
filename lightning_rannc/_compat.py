"""Every private torch/Lightning name and every version difference the package relies on.

Each shim is a named function or flag with one line saying what it stands for, in the style
of Lightning's ``lightning/fabric/utilities/imports.py`` and torchgpipe's ``stream.py``. When a
torch or Lightning upgrade breaks one of them, the failure names the shim here, and nothing
else in the package needs to change. ``tests/unit/test_compat.py`` fails when a ``_``-prefixed
attribute of torch or lightning is used anywhere else in the package.

Helpers in this module are implementation details and stay private to the package.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from lightning_utilities.core.imports import compare_version
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe
from torch.nn.parallel import DistributedDataParallel

__all__: list[str] = []

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
    """

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


def _has_no_grad(buffer: Any) -> bool:
    return isinstance(buffer, torch.Tensor) and not (buffer.is_floating_point() or buffer.is_complex())


PipelineStageClass: type[PipelineStage] = PipelineStage if TORCH_GREATER_EQUAL_2_13 else _Torch211Stage
"""The ``PipelineStage`` to build: torch's own, or on torch < 2.13 the one above."""
