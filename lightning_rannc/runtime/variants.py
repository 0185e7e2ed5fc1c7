"""The graphs captured for one batch shape: one per outcome of the step's guards.

A step that branches on a number that changes between steps (``if batch_idx % 2 == 0``) is
captured again when a guard no longer holds (``capture/guards.py``), and each capture keeps its
own stages. Before each step the runtime picks the variant whose guards hold for the step's
numbers. A value that went into a tensor operation and changed cannot be repeated by any graph,
and a step with more than ``MAX_VARIANTS`` outcomes for one shape would capture without end:
both are refused with the user's line named.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from lightning_rannc.capture.export import CapturedStep
from lightning_rannc.capture.guards import Guard, Source, describe, evaluate, sources_of
from lightning_rannc.errors import CaptureError

__all__ = ["MAX_VARIANTS", "Variant", "Variants", "numbers_read"]

MAX_VARIANTS = 8
"""Graphs kept per batch shape before a step whose numbers keep changing its graph is refused."""

Entry = TypeVar("Entry")


@dataclass
class Variant(Generic[Entry]):
    captured: CapturedStep
    """The capture (its tensors dropped): what to replay after the step."""
    entry: Entry
    """What runs it (the stages)."""


class Variants(Generic[Entry]):
    """The variants of one batch shape, in the order they were captured."""

    def __init__(self, named: str) -> None:
        self.named = named
        self.variants: list[Variant[Entry]] = []

    def add(self, captured: CapturedStep, entry: Entry) -> Variant[Entry]:
        variant = Variant(captured, entry)
        self.variants.append(variant)
        return variant

    def find(self, numbers: dict[Source, Any]) -> Variant[Entry] | None:
        """The variant whose guards hold for the step's ``numbers``; ``None`` if none does.
        Raises ``CaptureError`` when no new capture could help."""
        for variant in self.variants:
            if all(guard.holds(numbers) for guard in variant.captured.guards):
                return variant
        for variant in self.variants:
            baked = [g for g in variant.captured.guards if g.in_tensor and not g.holds(numbers)]
            branches_hold = all(g.holds(numbers) for g in variant.captured.guards if not g.in_tensor)
            if baked and branches_hold:
                raise CaptureError(_baked_message(self.named, baked[0], numbers))
        if len(self.variants) >= MAX_VARIANTS:
            changed = {g.where for v in self.variants for g in v.captured.guards if not g.holds(numbers)}
            raise CaptureError(
                f"{self.named} takes more than {MAX_VARIANTS} different paths for one batch shape, decided by "
                f"numbers that change between steps, at: {'; '.join(sorted(changed))}. RaNNCStrategy captures the "
                "step once per path. Compute such values with tensor operations (e.g. `torch.where`), or move the "
                "logic to a hook such as `on_train_batch_start`."
            )
        return None


def numbers_read(captures: Iterable[CapturedStep]) -> set[Source]:
    """The sources that the captures' guards and logged numbers read."""
    expressions = [g.expression for c in captures for g in c.guards]
    expressions += [item.expression for c in captures for item in c.logged if item.expression is not None]
    return sources_of(expressions)


def _baked_message(named: str, guard: Guard, numbers: dict[Source, Any]) -> str:
    sources = ", ".join(sorted(describe(s) for s in sources_of([guard.expression])))
    try:
        now = f"is now {evaluate(guard.expression, numbers)!r}"
    except (KeyError, ArithmeticError, TypeError, ValueError):
        now = "can no longer be read"
    return (
        f"{named} uses {sources} in a tensor operation at {guard.where}. The captured graph holds the value it "
        f"had at capture ({guard.result!r}), which {now}, so every step would compute with a stale number. "
        "Keep the value in a tensor the step reads instead: a buffer (`self.register_buffer(...)`) that a hook "
        "such as `on_train_batch_start` updates in place, or a tensor in the batch."
    )
