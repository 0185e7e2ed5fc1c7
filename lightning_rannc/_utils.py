"""Small helpers shared by the package. Implementation details: nothing here is public."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

__all__: list[str] = []

log = logging.getLogger("lightning_rannc")


def _configure_logger() -> None:
    # Same policy as Lightning's own logger: show INFO lines unless the user configured logging.
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    if not logging.getLogger().hasHandlers() and not log.handlers:
        log.addHandler(logging.StreamHandler())
        log.propagate = False


def where_defined(fn: Callable[..., Any]) -> str:
    """``file:line`` of a user's function, for error messages that point at user code."""
    fn = inspect.unwrap(getattr(fn, "__func__", fn))
    try:
        return f"{inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]}"
    except (OSError, TypeError):
        return getattr(fn, "__qualname__", repr(fn))


def tensor_bytes(value: Any) -> int:
    """Bytes of a tensor (real, fake or meta); 0 for anything else."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return 0


def optimizer_kind(optimizer: Any) -> str:
    """The memory model's name for an optimizer's state (``"adamw"`` for unknown ones: two
    moments per parameter is the common case)."""
    import torch

    if isinstance(optimizer, torch.optim.SGD):
        return "sgd_momentum" if optimizer.defaults.get("momentum", 0) else "sgd"
    if isinstance(optimizer, (torch.optim.RMSprop, torch.optim.Adagrad)):
        return type(optimizer).__name__.lower()
    return "adamw"


def layer_of(path: str, depth: int = 2) -> str:
    """The layer a module path is in: up to its first index (``model.transformer.h.3`` of
    ``model.transformer.h.3.attn``: a transformers model nests its layers deeper than two
    names), else its first ``depth`` names (``blocks.3``, ``emb``)."""
    names = path.split(".")
    index = next((k for k, name in enumerate(names) if name.isdigit()), None)
    return ".".join(names[: index + 1] if index is not None else names[:depth])
