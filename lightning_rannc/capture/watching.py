"""What a traced step reads or changes that a graph captured once cannot repeat.

Numbers that change between steps (``batch_idx``, ``self.global_step``, ``self.current_epoch``,
the optimizers' learning rates, the module's own numbers) are handed to the traced step as
watched numbers (``watching_numbers``, ``guards.py``), so that every step either reuses a graph
captured for the same uses or is captured again. Assigning attributes of the module would
happen only at capture: ``python_state`` lets the strategy warn, or for evaluation steps fall
back to the whole module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from lightning_rannc._compat import attached_trainer, scheduler_last_values, set_scheduler_last_values
from lightning_rannc.capture.guards import Guard, GuardBook, Source, WatchedFloat, WatchedInt, plain, watched

__all__ = ["watching_numbers", "current_numbers", "python_state", "warn_side_effects"]


class _WatchedTrainer:
    """Stands in for ``module.trainer`` while tracing: its per-step counters are watched numbers."""

    _COUNTERS = ("current_epoch", "global_step")

    def __init__(self, trainer: Any, book: GuardBook) -> None:
        object.__setattr__(self, "_wrapped", trainer)
        object.__setattr__(self, "_book", book)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._wrapped, name)
        return watched(value, ("trainer", name), self._book) if name in self._COUNTERS else value


@contextlib.contextmanager
def watching_numbers(module: nn.Module, batch_idx: int, book: GuardBook) -> Iterator[Any]:
    """While the step is traced: the trainer's counters, the optimizers' hyperparameters (the
    learning rate) and the module's public numbers are watched (``guards.py``), and so are
    torch functions given one. Yields ``batch_idx`` as a watched number."""
    trainer = attached_trainer(module)
    with contextlib.ExitStack() as stack:
        if trainer is not None:
            module.trainer = _WatchedTrainer(trainer, book)  # type: ignore[assignment]
            stack.callback(setattr, module, "trainer", trainer)
            stack.enter_context(_watching_optimizers(trainer, book))
            stack.enter_context(_watching_schedulers(trainer, book))
        stack.enter_context(_watching_attributes(module, book))
        stack.enter_context(book.mode())
        yield watched(batch_idx, ("batch_idx",), book)


@contextlib.contextmanager
def _watching_optimizers(trainer: Any, book: GuardBook) -> Iterator[None]:
    groups = [
        (group, (index, position)) for index, optimizer in enumerate(trainer.optimizers or [])
        for position, group in enumerate(optimizer.param_groups)
    ]  # fmt: skip
    saved = [(group, dict(group)) for group, _ in groups]
    for group, (index, position) in groups:
        for key, value in list(group.items()):
            group[key] = watched(value, ("optimizer", index, position, key), book)
    try:
        yield
    finally:
        for group, original in saved:
            group.update(original)


@contextlib.contextmanager
def _watching_schedulers(trainer: Any, book: GuardBook) -> Iterator[None]:
    """The learning rates ``get_last_lr()`` returns."""
    saved = []
    for index, config in enumerate(getattr(trainer, "lr_scheduler_configs", None) or []):
        values = scheduler_last_values(config.scheduler)
        if values is not None:
            saved.append((config.scheduler, values))
            watched_values = [watched(v, ("scheduler", index, i), book) for i, v in enumerate(values)]
            set_scheduler_last_values(config.scheduler, watched_values)
    try:
        yield
    finally:
        for scheduler, values in saved:
            set_scheduler_last_values(scheduler, values)


@contextlib.contextmanager
def _watching_attributes(module: nn.Module, book: GuardBook) -> Iterator[None]:
    """The module's own public ``int``/``float`` attributes (``self.temperature``). A ``bool``
    cannot be watched (it cannot be subclassed), so each public one is a guard whether or not
    the step reads it: a step after it changes is captured again (two values, two graphs)."""
    for name, value in vars(module).items():
        if not name.startswith("_") and isinstance(value, bool):
            where = f"`self.{name}` (a bool attribute of the module, checked at every step)"
            book.guards.append(Guard(("source", ("attribute", name)), value, where))
    originals = {name: value for name, value in vars(module).items() if _is_public_number(name, value)}
    wrapped = {name: watched(value, ("attribute", name), book) for name, value in originals.items()}
    module.__dict__.update(wrapped)
    try:
        yield
    finally:
        for name, value in wrapped.items():
            current = module.__dict__.get(name)
            if current is value:
                module.__dict__[name] = originals[name]
        for name, current in list(vars(module).items()):  # assigned by the step: keep a plain number
            if isinstance(current, (WatchedInt, WatchedFloat)):
                module.__dict__[name] = plain(current)


def current_numbers(module: nn.Module, batch_idx: int, sources: set[Source]) -> dict[Source, Any]:
    """The values the ``sources`` have now, for a step about to run; a source that no longer
    exists (an optimizer group) is left out, so guards reading it fail."""
    trainer = attached_trainer(module)
    values: dict[Source, Any] = {}
    for source in sources:
        kind = source[0]
        if kind == "batch_idx":
            values[source] = batch_idx
        elif kind == "trainer" and trainer is not None:
            values[source] = getattr(trainer, source[1])
        elif kind == "optimizer" and trainer is not None:
            with contextlib.suppress(IndexError, KeyError):
                values[source] = trainer.optimizers[source[1]].param_groups[source[2]][source[3]]
        elif kind == "scheduler" and trainer is not None:
            with contextlib.suppress(IndexError):
                values[source] = (scheduler_last_values(trainer.lr_scheduler_configs[source[1]].scheduler) or [])[
                    source[2]
                ]
        elif kind == "attribute" and source[1] in vars(module):
            values[source] = vars(module)[source[1]]
    return values


def _is_public_number(name: str, value: Any) -> bool:
    return not name.startswith("_") and isinstance(value, (int, float)) and not isinstance(value, bool)


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


def warn_side_effects(names: list[str], where: str) -> None:
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(
        f"{where} changes {', '.join(f'self.{n}' for n in names)}. RaNNCStrategy runs the step as a graph "
        "captured once, so Python side effects in it happen at capture only, not at every step. Move them "
        "to a hook (e.g. `on_train_batch_end`, which gets the step's outputs)."
    )
