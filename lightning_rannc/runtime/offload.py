"""The optimizer's state and step in host memory (``PartitionPlan.offload_optimizer``).

The user's optimizer object is kept (LR schedulers and Lightning hold it); the parameters in its
groups are replaced by host copies, so the state it creates lives on the host, and its ``step``
is wrapped: Lightning's closure (the training step, ``backward`` and gradient clipping, all on
the device) runs first, then the parameters and gradients are copied to the host, the user's
step runs there, and the new values are copied back. The host copies are refreshed from the
device at every step rather than kept as the reference: loading a checkpoint or pretrained
weights writes the device tensors, and a stale host copy would silently undo it. On a GPU the
host copies are pinned and the copies asynchronous, with one wait per step before the host
steps (never per micro-batch).
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["HostOptimizer"]


class HostOptimizer:
    """``optimizer`` stepping on host copies of its (device) parameters. ``names`` (``id`` ->
    canonical name) gets the host copies' ids, so checkpoints name their state as before."""

    def __init__(self, optimizer: Optimizer, names: MutableMapping[int, str]) -> None:
        self.optimizer = optimizer
        self.pairs: list[tuple[torch.Tensor, torch.nn.Parameter]] = []
        """(device parameter, its host copy), in the groups' order."""
        self._grads: dict[torch.nn.Parameter, torch.Tensor] = {}
        """Host gradient buffers, reused every step (pinning memory is slow)."""
        for group in optimizer.param_groups:
            hosted = []
            for param in group["params"]:
                host = _host_copy(param)
                if param in optimizer.state:  # state made before (a resumed run): move it along
                    optimizer.state[host] = {k: _to_host(v) for k, v in optimizer.state.pop(param).items()}
                names[id(host)] = names[id(param)]
                self.pairs.append((param, host))
                hosted.append(host)
            group["params"] = hosted
        self._user_step: Callable[..., Any] = optimizer.step
        # An instance attribute: LightningOptimizer and the precision plugins call `optimizer.step`.
        optimizer.step = self.step  # type: ignore[method-assign]

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        """Lightning's closure on the device, then the user's step on the host."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._to_host()
        self._user_step(**kwargs)
        self._to_device()
        return loss

    def _to_host(self) -> None:
        devices = set()
        for param, host in self.pairs:
            host.data.copy_(param.detach(), non_blocking=True)
            if param.grad is None:
                host.grad = None
                continue
            buffer = self._grads.get(host)
            if buffer is None:
                buffer = self._grads[host] = _host_like(host)
            buffer.copy_(param.grad.detach(), non_blocking=True)
            host.grad = buffer
            param.grad = None  # the device's copy is not needed again: free its memory now
            devices.add(param.device)
        for device in devices:
            if device.type == "cuda":  # the host reads what the device copies asynchronously
                torch.cuda.current_stream(device).synchronize()

    def _to_device(self) -> None:
        with torch.no_grad():
            for param, host in self.pairs:
                param.copy_(host.detach(), non_blocking=True)


def _host_like(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=torch.cuda.is_available())


def _host_copy(param: torch.Tensor) -> torch.nn.Parameter:
    host = _host_like(param)
    host.copy_(param.detach())
    return torch.nn.Parameter(host, requires_grad=param.requires_grad)


def _to_host(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value
