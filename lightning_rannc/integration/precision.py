"""Gradient clipping and loss-scaler decisions that must agree across ranks.

Each rank holds only its stages' gradients. Lightning clips by the norm of one process's
gradients, and its ``GradScaler`` skips a step when that process saw an inf: both would differ
between the stages of one model. The strategy routes them here instead: the norm is taken over
every stage, and an overflow found on any rank counts on every rank.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from lightning_rannc._compat import optimizer_unscales_itself, scaler_found_inf, scaler_unscaled

if TYPE_CHECKING:
    from lightning_rannc.strategy import RaNNCStrategyMixin as RaNNCStrategy

__all__ = ["install", "loss_scale"]


def install(strategy: RaNNCStrategy) -> None:
    """Route the precision plugin's gradient clipping and loss unscaling through the pipeline."""
    plugin = strategy.precision_plugin
    plugin.clip_grad_by_norm = functools.partial(_clip_grad_by_norm, strategy)  # type: ignore[method-assign]
    scaler = getattr(plugin, "scaler", None)
    if scaler is not None:
        # The class's method, not the attribute: a second fit must not wrap the wrapper.
        unscale = functools.partial(type(scaler).unscale_, scaler)
        scaler.unscale_ = functools.partial(_unscale_agreed, strategy, scaler, unscale)
        step = functools.partial(type(scaler).step, scaler)
        scaler.step = functools.partial(_step_agreed, scaler, step)


def loss_scale(strategy: RaNNCStrategy) -> float | torch.Tensor:
    """16-mixed's loss scale as a tensor on the device, without reading it: ``get_scale()`` is
    a ``.item()``, a wait for the device at every step. 1 without a scaler."""
    scaler = getattr(strategy.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return _scale_tensor(scaler, strategy.root_device)


def _scale_tensor(scaler: Any, device: torch.device) -> torch.Tensor:
    return scaler.scale(torch.ones((), device=device))


def _clip_grad_by_norm(strategy: RaNNCStrategy, optimizer: Optimizer, clip_val: int | float) -> None:
    assert strategy.engine is not None and strategy.engine.pipeline is not None
    strategy.engine.pipeline.clip_grad_norm(float(clip_val))


def _step_agreed(scaler: Any, step: Any, optimizer: Optimizer, *args: Any, **kwargs: Any) -> Any:
    """GradScaler.step. Lightning never calls ``unscale_`` for an optimizer that unscales in its
    own step (fused AdamW), so the agreement below would not run and each rank would skip steps
    on its own stage's overflows (and a rank holding no gradients would find no inf check at
    all). Unscale it first: the fused step then gets no scale and the agreed flag."""
    if optimizer_unscales_itself(optimizer) and not scaler_unscaled(scaler, optimizer):
        scaler.unscale_(optimizer)
    return step(optimizer, *args, **kwargs)


def _unscale_agreed(strategy: RaNNCStrategy, scaler: Any, unscale: Any, optimizer: Optimizer) -> None:
    """GradScaler.unscale_, then an overflow found on any rank counts on every rank."""
    unscale(optimizer)
    assert strategy.engine is not None and strategy.engine.pipeline is not None
    device = strategy.root_device
    strategy.engine.pipeline.unscale_updated_elsewhere(_scale_tensor(scaler, device).reciprocal())
    found = scaler_found_inf(scaler, optimizer)
    total = torch.stack([f.to(device) for f in found.values()]).amax() if found else torch.zeros((), device=device)
    if dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.MAX)
    for flag_device, flag in found.items():
        flag.copy_(total.to(flag_device))
    if not found:  # no parameter here: register the agreed flag for step() and update()
        found[device] = total
