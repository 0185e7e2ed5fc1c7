"""Where pretrained weights come from, read tensor by tensor so a rank never loads the whole model.

Each rank materialises only its own pipeline stage of a module built on the meta device, so it
must read only that stage's tensors. Every format here can do that: safetensors files are read
through their header (``safe_open``), torch files are memory-mapped (``torch.load(mmap=True)``:
pages of untouched tensors are never read), the shards of a sharded checkpoint are opened only
when they hold a requested key, and a ``torch.distributed.checkpoint`` directory is loaded for
the requested keys only, without collectives (each rank asks for different keys).

``match_keys`` pairs the module's names with the source's keys the way transformers'
``from_pretrained`` does: tied tensors are saved once, and a checkpoint of the base model loads
into a model with a head (and back) by adding or removing ``base_model_prefix``.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from lightning_rannc.errors import RuntimeSetupError

__all__ = ["TensorSource", "SourceMapping", "open_source", "match_keys"]

Shapes = dict[str, tuple[tuple[int, ...], torch.dtype]]

_DCP_MODEL_PREFIX = "model."  # Lightning's sharded layout: {"model": state_dict, "optimizer_0": ...}
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "U16": torch.uint16, "I16": torch.int16,
    "U32": torch.uint32, "I32": torch.int32, "U64": torch.uint64, "I64": torch.int64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_LIST_LIMIT = 10


class TensorSource:
    """Named tensors that can be listed without reading them and read a few at a time.

    Example::

        source = open_source("gpt2-checkpoint/")  # a `save_pretrained` directory
        shapes = source.shapes()  # {"transformer.wte.weight": ((50257, 768), torch.float32), ...}
        tensors = source.read(["transformer.h.0.attn.c_attn.weight"])
    """

    description: str

    def shapes(self) -> Shapes:
        """Every key with its shape and dtype, without reading tensor data."""
        raise NotImplementedError

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, on the CPU, reading only those."""
        raise NotImplementedError

    def _check_known(self, names: Iterable[str], known: Iterable[str]) -> list[str]:
        names, known = list(names), set(known)
        unknown = [name for name in names if name not in known]
        if unknown:
            raise RuntimeSetupError(f"{self.description} has no tensor {_listing(unknown)}.")
        return names


class _MappingSource(TensorSource):
    """Tensors already at hand: a state dict in memory or a memory-mapped torch file."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], description: str) -> None:
        self.tensors = tensors
        self.description = description

    def shapes(self) -> Shapes:
        return {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in self.tensors.items()}

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {name: self.tensors[name].cpu() for name in self._check_known(names, self.tensors)}


class _SafetensorsSource(TensorSource):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"the safetensors file {path}"

    def shapes(self) -> Shapes:
        with _safe_open(self.path) as file:
            return {name: _slice_shape(file.get_slice(name), self.description) for name in file.keys()}

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        with _safe_open(self.path) as file:
            return {name: file.get_tensor(name) for name in self._check_known(names, file.keys())}


class _ShardedSource(TensorSource):
    """A ``*.index.json`` whose ``weight_map`` says which shard file holds each key."""

    def __init__(self, index: Path, open_shard: Callable[[Path], TensorSource]) -> None:
        self.description = f"the sharded checkpoint {index}"
        self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        self.folder = index.parent
        self.open_shard = open_shard

    def shapes(self) -> Shapes:
        shapes: Shapes = {}
        for shard in sorted(set(self.weight_map.values())):
            shapes.update(self.open_shard(self.folder / shard).shapes())
        return shapes

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        by_shard: dict[str, list[str]] = {}
        for name in self._check_known(names, self.weight_map):
            by_shard.setdefault(self.weight_map[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for shard, shard_names in by_shard.items():
            tensors.update(self.open_shard(self.folder / shard).read(shard_names))
        return tensors


class _DistributedCheckpointSource(TensorSource):
    """A ``torch.distributed.checkpoint`` directory; the model's keys are under ``model.`` when
    Lightning wrote it, at the top level otherwise."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"the distributed checkpoint {path}"
        entries = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        tensors = {key: entry for key, entry in entries.items() if isinstance(entry, TensorStorageMetadata)}
        self.prefix = prefix = _DCP_MODEL_PREFIX if any(key.startswith(_DCP_MODEL_PREFIX) for key in tensors) else ""
        self.metadata = {key[len(prefix) :]: entry for key, entry in tensors.items() if key.startswith(prefix)}

    def shapes(self) -> Shapes:
        return {name: (tuple(entry.size), entry.properties.dtype) for name, entry in self.metadata.items()}

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        shapes = self.shapes()
        names = self._check_known(names, shapes)
        tensors = {name: torch.empty(shapes[name][0], dtype=shapes[name][1]) for name in names}
        # DCP flattens {"model": {name: t}} to the FQN "model.<name>", the key it saved; and it
        # fills only the keys asked for. no_dist: ranks ask for different keys, so no collectives.
        state: dict[str, Any] = {self.prefix.rstrip("."): tensors} if self.prefix else tensors
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=dcp.FileSystemReader(self.path), no_dist=True)
        return tensors


class SourceMapping(Mapping[str, torch.Tensor]):
    """A source as a read-only state dict, read key by key, for code that expects one (Lightning's
    ``on_load_checkpoint`` hooks see a checkpoint's ``"state_dict"``); ``open_source`` takes the
    source back whole, to read many keys at once."""

    def __init__(self, source: TensorSource) -> None:
        self.source = source
        self._keys = list(source.shapes())

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.source.read([key])[key]

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def open_source(source: str | os.PathLike[str] | Mapping[str, torch.Tensor]) -> TensorSource:
    """The weights at ``source``: a ``save_pretrained`` directory, a ``torch.distributed.checkpoint``
    directory, a ``.safetensors`` file, a torch file (state dict or Lightning checkpoint), or a state
    dict in memory. Nothing but metadata is read until ``read``.

    Raises:
        RuntimeSetupError: nothing at ``source``, or nothing this module can read.
        ImportError: a safetensors file, and the ``safetensors`` package is not installed.
    """
    if isinstance(source, SourceMapping):
        return source.source
    if isinstance(source, Mapping):
        return _from_mapping(source, "the state dict passed in memory")
    path = Path(source)
    if path.is_dir():
        return _open_directory(path)
    if not path.is_file():
        raise RuntimeSetupError(f"Cannot read weights from {str(path)!r}: no such file or directory.")
    return _SafetensorsSource(path) if path.suffix == ".safetensors" else _open_torch_file(path)


def _open_directory(path: Path) -> TensorSource:
    if (path / ".metadata").is_file():
        return _DistributedCheckpointSource(path)
    openers: dict[str, Callable[[Path], TensorSource]] = {
        "model.safetensors": _SafetensorsSource,
        "model.safetensors.index.json": lambda index: _ShardedSource(index, _SafetensorsSource),
        "pytorch_model.bin": _open_torch_file,
        "pytorch_model.bin.index.json": lambda index: _ShardedSource(index, _open_torch_file),
    }  # what transformers' `save_pretrained` writes, in the order `from_pretrained` prefers
    for name, open_file in openers.items():
        if (path / name).is_file():
            return open_file(path / name)
    raise RuntimeSetupError(
        f"The directory {str(path)!r} holds no weights this package reads: looked for {', '.join(openers)} "
        "(transformers' `save_pretrained`) and .metadata (`torch.distributed.checkpoint`). Pass the weights "
        "file itself if it has another name."
    )


def _open_torch_file(path: Path) -> TensorSource:
    try:
        loaded = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        raise RuntimeSetupError(
            f"torch.load(weights_only=True) refused {str(path)!r}: it holds objects other than tensors and plain "
            "containers. If you trust the file, allow their classes with `torch.serialization.add_safe_globals`, "
            f"or pass the state dict itself.\n{error}"
        ) from error
    if not isinstance(loaded, Mapping):
        raise RuntimeSetupError(f"{str(path)!r} holds a {type(loaded).__name__}, not a state dict or a checkpoint.")
    return _from_mapping(loaded, f"the torch file {path}")


def _from_mapping(entries: Mapping[Any, Any], description: str) -> TensorSource:
    """The tensors of a state dict, or of a Lightning checkpoint's ``"state_dict"`` (other entries skipped)."""
    if isinstance(entries.get("state_dict"), Mapping):
        entries, description = entries["state_dict"], description + " (a Lightning checkpoint's state_dict)"
    tensors = {key: value for key, value in entries.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}
    return _MappingSource(tensors, description)


def _safe_open(path: Path) -> Any:
    try:
        import safetensors
    except ImportError as error:
        raise ImportError(f"Reading {path} needs the safetensors package: `pip install safetensors`.") from error
    return safetensors.safe_open(str(path), framework="pt")


def _slice_shape(tensor_slice: Any, description: str) -> tuple[tuple[int, ...], torch.dtype]:
    name = tensor_slice.get_dtype()
    if name not in _SAFETENSORS_DTYPES:
        raise RuntimeSetupError(f"{description} holds a tensor of dtype {name}, which this package does not read.")
    return tuple(tensor_slice.get_shape()), _SAFETENSORS_DTYPES[name]


def match_keys(
    source: TensorSource,
    wanted: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    aliases: Mapping[str, str],
    *,
    where: str,
    base_model_prefix: str = "",
    strict: bool = True,
) -> dict[str, str]:
    """Which source key fills each of the module's tensors.

    Args:
        source: the weights.
        wanted: the module's tensors (names relative to the loaded submodule) with shape and dtype.
        aliases: each name of ``wanted`` -> its canonical name (tied tensors share one).
        where: the module, for errors (e.g. "GPT2LMHeadModel at `model` of MyLM").
        base_model_prefix: transformers' ``PreTrainedModel.base_model_prefix``: names are also tried
            with it added or removed, so base-model weights load into a model with a head and back.
        strict: missing and unexpected keys are errors; otherwise missing names are left out.

    Returns:
        canonical name -> source key. A canonical name is found if any of its aliases is in the
        source. Dtypes may differ (the caller casts); shapes may not.

    Raises:
        RuntimeSetupError: listing the missing, unexpected and wrongly shaped keys.
    """
    available = source.shapes()
    groups: dict[str, list[str]] = {}
    for name in wanted:
        groups.setdefault(aliases[name], []).append(name)
    found: dict[str, str] = {}
    missing: list[str] = []
    wrong_shape: list[str] = []
    for canonical, names in groups.items():
        names.sort(key=lambda name: name != canonical)  # the canonical name first
        match = next(((key, name) for key, name in _candidates(names, base_model_prefix) if key in available), None)
        if match is None:
            tied = [name for name in names if name != canonical]
            missing.append(canonical + (f" (tied: {', '.join(tied)})" if tied else ""))
        elif available[match[0]][0] != tuple(wanted[match[1]][0]):
            wrong_shape.append(f"{match[1]} {tuple(wanted[match[1]][0])} vs {match[0]} {available[match[0]][0]}")
        else:
            found[canonical] = match[0]
    used = {key for key, _ in _candidates(list(wanted), base_model_prefix)}
    unexpected = sorted(key for key in available if key not in used) if strict else []
    if wrong_shape or (strict and (missing or unexpected)):
        raise RuntimeSetupError(_mismatch_message(source, where, base_model_prefix, missing, unexpected, wrong_shape))
    return found


def _candidates(names: list[str], base_model_prefix: str) -> list[tuple[str, str]]:
    """(source key, module name) pairs to try: the names as they are, then with the prefix swapped."""
    pairs = [(name, name) for name in names]
    if base_model_prefix:
        prefix = base_model_prefix + "."
        pairs += [(name[len(prefix) :] if name.startswith(prefix) else prefix + name, name) for name in names]
    return pairs


def _mismatch_message(
    source: TensorSource, where: str, prefix: str, missing: list[str], unexpected: list[str], wrong_shape: list[str]
) -> str:
    lines = [f"Cannot load {source.description} into {where}:"]
    for label, keys in (
        ("missing from the source", missing),
        ("in the source but not in the module", unexpected),
        ("wrong shape (module vs source)", wrong_shape),
    ):
        if keys:
            lines.append(f"  {label} ({len(keys)}): {_listing(keys)}")
    lines += _prefix_hint(missing, unexpected)
    tried = f" (names were also tried with and without the base-model prefix {prefix!r})" if prefix else ""
    lines.append(
        f"Check that the weights are for this model and that its names are relative to the same module{tried}; "
        "pass `strict=False` to load only the tensors that match (a wrong shape is an error either way)."
    )
    return "\n".join(lines)


def _prefix_hint(missing: list[str], unexpected: list[str]) -> list[str]:
    """A line naming the prefix that tells the source's keys from the module's, if one does."""
    for name in missing[:1]:
        name = name.partition(" ")[0]  # without its "(tied: ...)"
        for key in unexpected:
            if key.endswith("." + name):
                return [f"The source's keys seem to have {key[: -len(name)]!r} in front of the module's names."]
            if name.endswith("." + key):
                return [f"The module's names seem to have {name[: -len(key)]!r} in front of the source's keys."]
    return []


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST_LIMIT])
    return shown + (f" ... and {len(keys) - _LIST_LIMIT} more" if len(keys) > _LIST_LIMIT else "")
