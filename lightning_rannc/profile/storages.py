"""Which storages a run allocates and frees, to find the most bytes it holds at once.

Shared by the analytic estimate (fake tensors, per graph node) and the profiler (real tensors,
per block). The Python object of a storage, fake or real, lives as long as the storage does, so
a ``weakref.finalize`` on it notes the release.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from lightning_rannc._compat import TorchDispatchMode, storage_key

__all__ = ["AllocationLog", "AllocationWatch", "most_live", "tensors_in"]


class AllocationLog:
    """Storages allocated since it was made, with a serial each (addresses are reused, serials
    are not), and the events: ``(serial, +bytes or -bytes, where)``, serial ``-1`` meaning an
    operator ended at ``where`` (a graph node's index, or 0)."""

    def __init__(self, existing: Iterable[torch.Tensor]) -> None:
        self.existing = {storage_key(t.untyped_storage()) for t in existing}
        """Storages that were there before: not allocated by the run."""
        self.serial: dict[int, int] = {}
        """Live storage (``storage_key``) -> serial."""
        self._serials = itertools.count()
        self.events: list[tuple[int, int, int]] = []
        self.finalizers: list[weakref.finalize] = []
        self.where = 0
        """Where a release is attributed (the operator running when the storage dies)."""

    def allocated(self, tensor: torch.Tensor, where: int) -> None:
        storage = tensor.untyped_storage()
        key = storage_key(storage)
        if key in self.existing or key in self.serial:
            return
        serial = self.serial[key] = next(self._serials)
        size = storage.nbytes()
        self.events.append((serial, size, where))
        self.finalizers.append(weakref.finalize(storage, self._released, key, serial, size))

    def ended(self, where: int) -> None:
        self.events.append((-1, 0, where))

    def serial_of(self, tensor: torch.Tensor) -> int:
        """The serial of a live storage allocated in the run, or -1."""
        return self.serial.get(storage_key(tensor.untyped_storage()), -1)

    def close(self) -> None:
        """Stop noting releases (the run is over; the log stays readable)."""
        for finalizer in self.finalizers:
            finalizer.detach()

    def _released(self, key: int, serial: int, size: int) -> None:
        self.serial.pop(key, None)
        self.events.append((serial, -size, self.where))


class AllocationWatch(TorchDispatchMode):
    """Notes in ``log`` the storages every aten operator allocates, while active (forward and
    backward alike: autograd's threads inherit the mode)."""

    def __init__(self, log: AllocationLog) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.namespace == "aten":
            for tensor in tensors_in(out):
                self.log.allocated(tensor, 0)
            self.log.ended(0)
        return out


def most_live(events: list[tuple[int, int, int]], excluded: set[int], size: int) -> list[int]:
    """Replay the events: per ``where`` (``0 .. size - 1``), the most bytes live when one of its
    operators ended, the storages in ``excluded`` aside."""
    peaks, live = [0] * size, 0
    for serial, change, where in events:
        if serial < 0:
            peaks[where] = max(peaks[where], live)
        elif serial not in excluded:
            live += change
    return peaks


def tensors_in(value: Any) -> Any:
    """The tensors in a value, a list, a tuple or a dict (not nested deeper than operators return)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
