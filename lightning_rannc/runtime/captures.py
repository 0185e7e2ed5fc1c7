"""The step captured for a micro-batch: with the module's own tensors, or with fake ones.

Planning needs the step's graph at the micro-batch size (and, when the search picks the
micro-batch count, at the smallest and the largest micro-batch it may pick, to time the blocks
there too). After the first batch, other stages' tensors are freed, so a batch of another shape
is captured on fake tensors, and so is a module built on the meta device, which cannot run at
all.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_rannc.capture.batch import FlatBatch
from lightning_rannc.capture.export import CapturedStep, capture_step, capture_training_step
from lightning_rannc.capture.graph import StepGraph
from lightning_rannc.capture.module_state import fake_module_state, has_meta_tensors

if TYPE_CHECKING:
    from lightning_rannc.runtime.planning import EngineOptions

__all__ = ["ResizedSample", "capture_micro", "fake_capture", "timing_samples", "captured_for_costs"]

log = logging.getLogger("lightning_rannc")

_SMALLEST_TIMED = 2
"""Fewest samples of the second timing: one sample times the noisiest, and BatchNorm in
training refuses a batch with one value per channel."""


@dataclass(frozen=True)
class ResizedSample:
    """A micro-batch of another size to time the blocks on: its size, and a call that captures
    the step on it and returns the graph and the micro-batch's leaves."""

    size: int
    capture: Callable[[], tuple[StepGraph, list[torch.Tensor]]]


def capture_micro(
    module: nn.Module, batch: FlatBatch, num_microbatches: int, batch_idx: int = 0
) -> tuple[CapturedStep, StepGraph]:
    """Capture the step for the first micro-batch of ``batch`` with the module's own tensors."""
    captured = capture_training_step(module, batch.first(batch.size // num_microbatches), batch_idx)
    return captured, StepGraph.from_captured(captured)


@contextlib.contextmanager
def fake_capture(
    module: nn.Module,
    batch: FlatBatch,
    num_microbatches: int,
    device: torch.device,
    step_name: str = "training_step",
    extra_args: tuple[Any, ...] = (),
    batch_idx: int = 0,
) -> Iterator[tuple[CapturedStep, StepGraph, list[torch.Tensor]]]:
    """Capture the step with fake tensors standing in for the module's and the batch's (other
    stages' tensors are freed or were never allocated). Yields the capture, its graph and the
    fake micro-batch leaves, valid inside the block."""
    size = batch.size // num_microbatches
    with fake_module_state(module, device) as mode:
        micro = [mode.from_tensor(leaf) for leaf in batch.first_leaves(size)]
        captured = capture_step(module, batch.with_leaves(micro), step_name, extra_args, batch_idx)
        yield captured, StepGraph.from_captured(captured), micro


def timing_samples(
    module: nn.Module, batch: FlatBatch, microbatch_size: int, options: EngineOptions
) -> list[ResizedSample]:
    """When the search picks the micro-batch count: the step on the smallest and on the largest
    micro-batch it may choose (the whole batch), captured when called, so that ``block_costs``
    times the blocks at those sizes too and the search interpolates between timings instead of
    scaling one. Empty when the count is given (costs are measured at that size). A size closer
    than twice or half ``microbatch_size`` is left out: two close sizes give a noisy line.

    The smaller size gives the part of each time that does not shrink with the micro-batch
    (operator launches); the larger one how time grows beyond proportion (on a CPU, a micro-batch
    whose activations outgrow the caches: the example GPT's blocks at 4 times the reference size
    took 1.02-1.17 times what the line through the two smaller sizes gives, in
    ``benchmarks/profile_sizes.py``)."""
    if options.num_microbatches is not None:
        return []
    fewest_samples = -(-batch.size // options.config.max_micro_batches)  # with the most micro-batches
    smallest = max(options.config.min_micro_batch_size, _SMALLEST_TIMED, fewest_samples)
    smaller = [smallest] if 2 * smallest <= microbatch_size else []
    larger = [batch.size] if batch.size >= 2 * microbatch_size else []
    return [_sample(module, batch, size) for size in smaller + larger]


def _sample(module: nn.Module, batch: FlatBatch, size: int) -> ResizedSample:
    def capture() -> tuple[StepGraph, list[torch.Tensor]]:
        return StepGraph.from_captured(capture_training_step(module, batch.first(size))), batch.first_leaves(size)

    return ResizedSample(size, capture)


@contextlib.contextmanager
def captured_for_costs(
    module: nn.Module, batch: FlatBatch, num_microbatches: int, device: torch.device
) -> Iterator[tuple[StepGraph, list[torch.Tensor], bool]]:
    """The graph and micro-batch to cost, and whether they are fake (a module on the meta device)."""
    started = time.perf_counter()
    if has_meta_tensors(module):
        with fake_capture(module, batch, num_microbatches, device) as (_, graph, micro):
            log.info("captured the step on fake tensors in %.1f s", time.perf_counter() - started)
            yield graph, micro, True
        return
    _, graph = capture_micro(module, batch, num_microbatches)
    log.info("captured the step in %.1f s (%d nodes)", time.perf_counter() - started, len(graph))
    yield graph, batch.first_leaves(batch.size // num_microbatches), False
