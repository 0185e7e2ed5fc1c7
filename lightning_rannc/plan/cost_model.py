"""Costs the planner works from: plain numbers per block, no torch.

The profiler fills ``BlockCost`` from measurements; tests fill it with synthetic numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BlockCost", "with_fixed_parts", "with_larger_timing"]


@dataclass(kw_only=True, frozen=True)
class BlockCost:
    """One block: a contiguous range of graph nodes that the planner never splits."""

    start: int
    """First node of the block in the graph's topological order."""
    end: int
    """One past the last node."""
    fwd_ms: float
    """Forward time of one micro-batch."""
    bwd_ms: float
    """Backward time of one micro-batch."""
    activation_bytes: int
    """Bytes saved for backward by one micro-batch."""
    cut_bytes: int
    """Bytes of the values live across the cut after this block (sent to the next stage)."""
    tensor_names: tuple[str, ...] = ()
    """Parameters/buffers the block's nodes use."""
    module_paths: tuple[str, ...] = ()
    """Module paths of the block's nodes, in order, without repeats."""
    fwd_fixed_ms: float = 0.0
    """Part of ``fwd_ms`` that does not grow with the micro-batch size (operator launches)."""
    bwd_fixed_ms: float = 0.0
    """Part of ``bwd_ms`` that does not grow with the micro-batch size."""
    workspace_bytes: int = 0
    """Most bytes one micro-batch holds while the block runs beyond ``activation_bytes`` and
    parameter gradients: gradients in flight and temporaries (the loss's gradient over a large
    vocabulary). Only one micro-batch runs at a time, so a stage needs the largest of its
    blocks' once, not once per micro-batch in flight. 0: unknown."""
    weight_copy_bytes: int = 0
    """Parameters cast to half precision by autocast and saved for backward. Autocast casts each
    parameter once per region and the whole step runs in one, so the micro-batches share the
    copies: a fixed cost of the stage, not an activation of each micro-batch (the analytic
    estimate tells them apart; measured profiles count them in ``activation_bytes``)."""

    larger_factor: float = 0.0
    """Size of a second timing's micro-batches relative to this one's (above 1), or 0: none."""
    larger_fwd_ms: float = 0.0
    """Forward time of one micro-batch ``larger_factor`` times as large."""
    larger_bwd_ms: float = 0.0
    """Backward time of one micro-batch ``larger_factor`` times as large."""

    def scaled(self, factor: float) -> BlockCost:
        """The block's cost for micro-batches ``factor`` times as large: activations and cut bytes
        grow linearly (bytes are linear in the batch); times grow linearly beyond the fixed part,
        and above this size (``factor`` > 1) with a larger timing, also by that timing's excess
        over the line, in proportion to the square of the way there: a parabola through the
        three timings that leaves this one at the line's slope. A straight line from this
        timing to the larger one would overshoot between them where time grows faster than the
        micro-batch (by 2-5% halfway on the 2-core CPU). The result is for one size: it keeps
        no larger timing."""
        return dataclasses.replace(
            self,
            fwd_ms=self._time(factor, self.fwd_ms, self.fwd_fixed_ms, self.larger_fwd_ms),
            bwd_ms=self._time(factor, self.bwd_ms, self.bwd_fixed_ms, self.larger_bwd_ms),
            activation_bytes=int(self.activation_bytes * factor),
            workspace_bytes=int(self.workspace_bytes * factor),
            cut_bytes=int(self.cut_bytes * factor),
            larger_factor=0.0,
            larger_fwd_ms=0.0,
            larger_bwd_ms=0.0,
        )

    def _time(self, factor: float, ms: float, fixed_ms: float, larger_ms: float) -> float:
        line = fixed_ms + (ms - fixed_ms) * factor
        if factor <= 1 or self.larger_factor <= 1:
            return line
        excess = larger_ms - (fixed_ms + (ms - fixed_ms) * self.larger_factor)
        return max(ms, line + excess * ((factor - 1) / (self.larger_factor - 1)) ** 2)


def with_fixed_parts(
    costs: Sequence[BlockCost], smaller: Sequence[BlockCost], size: int, smaller_size: int
) -> list[BlockCost]:
    """``costs`` (micro-batches of ``size``) with the part of each block's time that does not
    grow with the micro-batch, from the same blocks timed on micro-batches of ``smaller_size``:
    the intercept of the line through the two timings, kept between 0 and the smaller of the
    two times (so that ``scaled`` never gives a negative or shrinking time).

    Without it ``scaled`` shrinks every time in proportion, and small micro-batches, whose
    operator launches and Python overhead do not shrink, look cheaper than they run."""
    if not 0 < smaller_size < size:
        raise ValueError(f"smaller_size must be in (0, {size}), got {smaller_size}")
    return [
        dataclasses.replace(
            cost,
            fwd_fixed_ms=_intercept(cost.fwd_ms, small.fwd_ms, size, smaller_size),
            bwd_fixed_ms=_intercept(cost.bwd_ms, small.bwd_ms, size, smaller_size),
        )
        for cost, small in zip(costs, smaller, strict=True)
    ]


def _intercept(large_ms: float, small_ms: float, size: int, smaller_size: int) -> float:
    value = (small_ms * size - large_ms * smaller_size) / (size - smaller_size)
    return min(max(value, 0.0), small_ms, large_ms)


def with_larger_timing(
    costs: Sequence[BlockCost], larger: Sequence[BlockCost], size: int, larger_size: int
) -> list[BlockCost]:
    """``costs`` (micro-batches of ``size``) with the same blocks' times on micro-batches of
    ``larger_size``, kept at least as long as ``costs``' own (a noisy timing never makes a
    larger micro-batch cheaper). ``scaled`` then bends the line through the smaller timings up
    (or down) to meet this one: on a CPU, time grows faster than the micro-batch once its
    activations outgrow the caches, which a line through smaller sizes misses."""
    if larger_size <= size:
        raise ValueError(f"larger_size must be above {size}, got {larger_size}")
    return [
        dataclasses.replace(
            cost,
            larger_factor=larger_size / size,
            larger_fwd_ms=max(big.fwd_ms, cost.fwd_ms),
            larger_bwd_ms=max(big.bwd_ms, cost.bwd_ms),
        )
        for cost, big in zip(costs, larger, strict=True)
    ]
