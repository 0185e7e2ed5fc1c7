"""Block costs kept between planning runs, so the same step is profiled once.

The strategy profiles when it chooses the layout at ``setup`` and needs the same costs again at
the first batch; a second ``fit`` of the same module needs them again too. Costs are keyed by
everything that changes them: the graph (its fingerprint includes dtypes), the micro-batch's
shapes, the block boundaries, the device, how they were obtained (measured or analytic for a
preset) and the torch version. With a directory they also live on disk as small JSON files
(RaNNC keeps profiles the same way), written atomically so that concurrent runs never read half
a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_rannc.plan.cost_model import BlockCost

__all__ = ["ProfileCache", "profile_key"]

log = logging.getLogger("lightning_rannc")

_TUPLE_FIELDS = ("tensor_names", "module_paths")


def profile_key(
    fingerprint: str,
    leaves: Sequence[torch.Tensor],
    spans: Sequence[tuple[int, int]],
    device: str,
    method: str,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> str:
    """A short hash of what the costs of ``spans`` depend on. ``device`` names the hardware
    (``"cpu"``, the CUDA device's name); ``method`` is ``"measured"`` or ``"analytic:<preset>"``;
    ``tensors`` are the graph's parameters and buffers (the fingerprint leaves out their sizes:
    a wider model has the same graph)."""
    parts = [
        fingerprint,
        ";".join(f"{tuple(leaf.shape)}:{leaf.dtype}" for leaf in leaves),
        ";".join(f"{name}{tuple(t.shape)}:{t.dtype}:{t.requires_grad}" for name, t in sorted((tensors or {}).items())),
        ",".join(f"{a}-{b}" for a, b in spans),
        device,
        method,
        torch.__version__,
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


class ProfileCache:
    """Block costs by ``profile_key``: in memory, and on disk under ``directory`` if given."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[str, list[BlockCost]] = {}

    def load(self, key: str) -> list[BlockCost] | None:
        if key in self._memory:
            return self._memory[key]
        costs = self._read(key)
        if costs is not None:
            self._memory[key] = costs
        return costs

    def store(self, key: str, costs: Sequence[BlockCost]) -> None:
        self._memory[key] = list(costs)
        if self.directory is not None:
            self._write(key, costs)

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{key}.json"

    def _read(self, key: str) -> list[BlockCost] | None:
        if self.directory is None or not self._path(key).exists():
            return None
        try:
            rows = json.loads(self._path(key).read_text())
            return [_from_row(row) for row in rows]
        except (OSError, ValueError, TypeError) as error:  # a damaged file costs a new profile, no more
            log.warning("ignoring the unreadable profile %s (%s); profiling again", self._path(key), error)
            return None

    def _write(self, key: str, costs: Sequence[BlockCost]) -> None:
        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps([dataclasses.asdict(cost) for cost in costs])
        handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, self._path(key))


def _from_row(row: dict[str, Any]) -> BlockCost:
    values: dict[str, Any] = {k: tuple(v) if k in _TUPLE_FIELDS else v for k, v in row.items()}
    return BlockCost(**values)
