"""Random streams that depend on what is computed, not on where or when.

Every random op of a stage (dropout, ``rand_like``, ...) is preceded in the stage's graph by a
call to ``reseed(node_index)``, which seeds the generator from (seed, step, replica,
micro-batch, node). Dropout masks are then the same whatever the stage split, the schedule or
the order of micro-batches, and runs with the same seed are reproducible. ``stream`` sets the
step's key around a stage's forward and restores the training RNG afterwards.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from lightning_rannc._compat import is_op_overload

__all__: list[str] = []

_KEY = threading.local()


@contextlib.contextmanager
def stream(key: tuple[int, ...], device: torch.device) -> Iterator[None]:
    """Seed random ops inside this block from ``key`` and each op's node; restore the RNG after."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        previous, _KEY.value = getattr(_KEY, "value", None), (key, device_generator(device))
        try:
            yield
        finally:
            _KEY.value = previous


def reseed(node_index: int) -> None:
    current = getattr(_KEY, "value", None)
    if current is not None:  # outside a stream (profiling, verification) the ambient RNG is used
        key, generator = current
        generator.manual_seed(hash((*key, node_index)) & (2**63 - 1))


def device_generator(device: torch.device) -> torch.Generator:
    """The default generator of ``device``."""
    # Not torch.manual_seed: it also queues a CUDA seeding call with a formatted stack trace
    # while CUDA is uninitialised, which costs milliseconds per call and grows without bound.
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def is_random(target: object) -> bool:
    return is_op_overload(target) and torch.Tag.nondeterministic_seeded in getattr(target, "tags", ())
