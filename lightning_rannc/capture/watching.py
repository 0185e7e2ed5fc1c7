"""What a traced step reads or changes that a graph captured once cannot repeat.

A step that computes with ``batch_idx``, ``trainer.global_step`` or ``current_epoch``, or that
assigns attributes of the module, would do so only at capture. While the step is traced these
are watched (``WatchedIndex``, ``watching_counters``, ``python_state``) so that the strategy
can warn, or for evaluation steps fall back to the whole module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from lightning_rannc._compat import attached_trainer

__all__ = ["WatchedIndex", "watching_counters", "python_state", "warn_fixed_counters", "warn_side_effects"]


class WatchedIndex(int):
    """The ``batch_idx`` handed to the traced step: an int that notes being used."""

    reads: set[str]

    def __new__(cls, value: int, reads: set[str]) -> WatchedIndex:
        index = super().__new__(cls, value)
        index.reads = reads
        return index


def _noting(name: str) -> Any:
    method = getattr(int, name)

    def noted(self: WatchedIndex, *args: Any) -> Any:
        self.reads.add("batch_idx")
        return method(int(self), *args)

    return noted


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__mod__", "__floordiv__",
              "__truediv__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__index__",
              "__float__", "__format__", "__str__", "__repr__", "__hash__"):  # fmt: skip
    setattr(WatchedIndex, _name, _noting(_name))


class _WatchedTrainer:
    """Stands in for ``module.trainer`` while tracing and notes reads of per-step counters."""

    _COUNTERS = ("current_epoch", "global_step")

    def __init__(self, trainer: Any, reads: set[str]) -> None:
        object.__setattr__(self, "_wrapped", trainer)
        object.__setattr__(self, "_reads", reads)

    def __getattr__(self, name: str) -> Any:
        if name in self._COUNTERS:
            self._reads.add(name)
        return getattr(self._wrapped, name)


@contextlib.contextmanager
def watching_counters(module: nn.Module, reads: set[str]) -> Iterator[None]:
    trainer = attached_trainer(module)
    if trainer is None:
        yield
        return
    module.trainer = _WatchedTrainer(trainer, reads)  # type: ignore[assignment]
    try:
        yield
    finally:
        module.trainer = trainer


def python_state(module: nn.Module) -> dict[str, Any]:
    """What a step's Python side effects would change: each public attribute of the module, as
    ``_fingerprint``. Private ones are Lightning's and torch's."""
    return {
        name: _fingerprint(value) for name, value in vars(module).items() if not name.startswith("_") and name != "log"
    }


def _fingerprint(value: Any, depth: int = 2) -> Any:
    """The object, and for containers their length and (two levels down) their items' objects:
    changes when an attribute is assigned, appended to, or one of its entries replaced
    (``self.outputs[dataloader_idx].append(...)``, ``self.stats["n"] = ...``)."""
    if isinstance(value, dict):
        items: Any = [*value.keys(), *value.values()]
    elif isinstance(value, (list, tuple, set)):
        items = value
    else:
        return id(value)
    inner = tuple(_fingerprint(item, depth - 1) for item in items) if depth > 0 else ()
    return id(value), len(value), inner


def warn_fixed_counters(names: list[str], where: str) -> None:
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(
        f"{where} reads {', '.join(names)}. RaNNCStrategy captures the step once, so "
        "every step uses the value seen at capture (batch_idx=0, the first step's epoch and step): "
        "anything computed from it is fixed. Move such logic to a hook (e.g. `on_train_batch_start`) "
        "or put the value in the batch."
    )


def warn_side_effects(names: list[str], where: str) -> None:
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(
        f"{where} changes {', '.join(f'self.{n}' for n in names)}. RaNNCStrategy runs the step as a graph "
        "captured once, so Python side effects in it happen at capture only, not at every step. Move them "
        "to a hook (e.g. `on_train_batch_end`, which gets the step's outputs)."
    )
