"""Plan a LightningModule for a cluster without having it: capture on fake tensors, analytic
costs for a device preset, then the search. Nothing is allocated; a module built on the meta
device works (that is how ``python -m lightning_rannc plan`` builds it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_rannc._utils import optimizer_kind as _optimizer_kind
from lightning_rannc._utils import where_defined
from lightning_rannc.capture.batch import FlatBatch
from lightning_rannc.capture.export import capture_training_step
from lightning_rannc.capture.graph import StepGraph, group_nodes
from lightning_rannc.capture.module_state import fake_module_state
from lightning_rannc.errors import CaptureError, PlanError
from lightning_rannc.plan.search import SearchResult, SearchSettings, plan_shape, search_plan
from lightning_rannc.profile.analytic import estimate_blocks
from lightning_rannc.profile.profiler import find_no_grad_values
from lightning_rannc.profile.tensors import tensor_table

__all__ = ["plan_module", "precision_remedies", "sample_batch", "optimizer_kind", "PRECISIONS"]

log = logging.getLogger("lightning_rannc")

PRECISIONS = {
    "32-true": (None, None),
    "bf16-mixed": (torch.bfloat16, None),
    "16-mixed": (torch.float16, None),
    "bf16-true": (None, torch.bfloat16),
    "16-true": (None, torch.float16),
}
"""Lightning's precision names: (the autocast dtype, the dtype parameters and inputs take)."""


def plan_module(
    module: nn.Module, batch: Any, settings: SearchSettings, max_blocks: int = 128, precision: str = "32-true"
) -> SearchResult:
    """Search the best plan for ``module``'s training step on ``settings.num_devices`` devices.

    The step is captured for one sample of ``batch`` and costs scale linearly to larger
    micro-batches; ``settings.global_batch_size`` is the batch the plan splits. ``precision`` is
    the Trainer's: mixed precision captures and costs the step under autocast (the half-precision
    activations and FLOP rate follow from the graph), and a ``-true`` precision converts the
    module's floating-point tensors and the batch's, as Lightning does (then parameters,
    gradients and optimizer state are half as large too); the module itself is left as it was.
    Where nothing fits, the ``PlanError`` also names each lower precision in which a plan fits.
    """
    flat = FlatBatch.of(batch, where_defined(type(module).training_step))  # type: ignore[attr-defined]
    try:
        return _search(module, flat, settings, max_blocks, precision)
    except PlanError as error:
        raise error.with_remedies(precision_remedies(module, flat, settings, max_blocks, precision)) from None


LOWER_PRECISIONS = {"32-true": ("bf16-mixed", "bf16-true"), "bf16-mixed": ("bf16-true",), "16-mixed": ("16-true",)}
"""Precisions that hold less, to try when the model does not fit in the Trainer's."""


def precision_remedies(
    module: nn.Module, batch: FlatBatch, settings: SearchSettings, max_blocks: int, precision: str
) -> list[str]:
    """Each lower precision than ``precision`` in which some plan fits, as a remedy. A search
    each, on analytic costs for ``settings.device``: the step is captured again on fake tensors
    (its activations' dtypes and FLOP rate change), so the module, real or on the meta device,
    is left as it was, and whatever autocast the caller runs under is switched off."""
    remedies = []
    sample = batch.with_leaves([leaf.detach().cpu() for leaf in batch.first_leaves(1)])
    for lower in LOWER_PRECISIONS.get(precision, ()):
        try:
            with _no_autocast():
                found = _search(module, sample, settings, max_blocks, lower).plan
        except PlanError:
            continue
        remedies.append(f"Trainer(precision={lower!r}) (it finds {plan_shape(found)})")
    return remedies


def _search(
    module: nn.Module, flat: FlatBatch, settings: SearchSettings, max_blocks: int, precision: str
) -> SearchResult:
    autocast, dtype = _precision(precision)
    if dtype is not None:  # the module's tensors are converted as fakes below
        flat = flat.with_leaves([_converted(leaf, dtype) for leaf in flat.leaves])
    with fake_module_state(module, torch.device("cpu"), dtype) as mode, _autocast(autocast):
        sample = [mode.from_tensor(leaf) for leaf in flat.first_leaves(1)]
        captured = capture_training_step(module, flat.with_leaves(sample))
        graph = StepGraph.from_captured(captured)
        spans = group_nodes(graph, max_blocks)
        costs = estimate_blocks(graph, sample, spans, device=settings.device)
        result = search_plan(
            costs,
            reference_microbatch_size=1,
            settings=settings,
            tensors=tensor_table(graph.tensors),
            graph_fingerprint=graph.fingerprint(),
        )
        plan = result.plan
        plan.no_grad_values = find_no_grad_values(graph, sample, [s.node_start for s in plan.stages[1:]])
    return result


def _precision(precision: str) -> tuple[torch.dtype | None, torch.dtype | None]:
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"Unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}.") from None


@contextlib.contextmanager
def _autocast(dtype: torch.dtype | None) -> Iterator[None]:
    # The fake tensors live on the CPU; the analytic costs follow CUDA's autocast policy for a
    # GPU preset (``profile/analytic.py``).
    with torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def _no_autocast() -> Iterator[None]:
    # The strategy plans inside the Trainer's precision context, which may autocast.
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield


def _converted(leaf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return leaf.to(dtype) if leaf.is_floating_point() else leaf


def sample_batch(module: nn.Module) -> Any:
    """One training batch of ``module``: the first of its ``train_dataloader()``."""
    loader = getattr(module, "train_dataloader", None)
    try:
        return next(iter(loader())) if loader is not None else None
    except (NotImplementedError, MisconfigurationException):
        # LightningModule's default train_dataloader raises when the user defines none.
        pass
    raise CaptureError(
        f"{type(module).__name__} has no `train_dataloader()` to take a sample batch from: define one "
        "(the planner takes its first batch; the data can be random, only shapes and dtypes matter)."
    )


def optimizer_kind(module: nn.Module) -> str:
    """The memory model's name for the optimizer ``configure_optimizers`` makes ("adamw" if unknown)."""
    try:
        configured = module.configure_optimizers()  # type: ignore[operator]
    except Exception as error:  # user code that needs a Trainer; the guess only sizes optimizer state
        log.info("configure_optimizers() failed without a Trainer (%s); assuming Adam-like state.", error)
        return "adamw"
    return _optimizer_kind(_first_optimizer(configured))


def _first_optimizer(configured: Any) -> Any:
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, dict):
        return configured.get("optimizer")
    if isinstance(configured, (list, tuple)) and configured:
        return _first_optimizer(configured[0])
    return None
