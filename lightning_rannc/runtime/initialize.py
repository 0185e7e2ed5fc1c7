"""Initial values of the tensors a rank materialises for a module created on the meta device.

Each rank allocates only its stages' tensors and initialises them the way the model would have
been initialised whole, module by module:
- modules inside a transformers ``PreTrainedModel`` through that model's ``_init_weights``
  (transformers' own initialisation; GPT-2's ``Conv1D`` has no ``reset_parameters``), on every
  module whose subtree holds a tensor of the rank, children before parents as transformers
  applies it (a parent may re-initialise a child's weight: GPT-2's scaled projections);
- every other module that holds a tensor of the rank directly, through ``reset_parameters()``.

Each call draws from a stream seeded by (seed, module path): a tensor gets the same values on
every rank that holds it and whatever the stage split. Calls on a module whose other tensors
are still meta only write those meta tensors, which costs nothing.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from lightning_rannc._compat import pretrained_init
from lightning_rannc._rng import device_generator
from lightning_rannc.errors import RuntimeSetupError

__all__ = ["initialize_tensors"]


def initialize_tensors(
    module: nn.Module, aliases: Mapping[str, str], names: Iterable[str], seed: int, device: torch.device
) -> None:
    """Initialise the tensors ``names`` (canonical names; ``aliases`` maps every path of a
    parameter or buffer to its canonical name) of ``module``, which are allocated and empty."""
    wanted = set(names)
    paths = [path for path, canonical in aliases.items() if canonical in wanted]
    calls = _initialisers(module, paths)
    generator = device_generator(device)
    for path, call in calls:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            # zlib.crc32, not hash(): str hashes differ between processes (PYTHONHASHSEED).
            generator.manual_seed(hash((seed, zlib.crc32(path.encode()))) & (2**63 - 1))
            call()


def _initialisers(module: nn.Module, paths: list[str]) -> list[tuple[str, Callable[[], None]]]:
    """(module path, call) for every module that initialises a tensor at ``paths``, descendants
    before ancestors; refuses modules that have no way to initialise their tensors."""
    owners = {path.rpartition(".")[0] for path in paths}
    holders = {prefix for owner in owners for prefix in _prefixes(owner)}
    pretrained = _pretrained_models(module)
    calls: list[tuple[str, Callable[[], None]]] = []
    missing: list[str] = []
    for path, child in reversed(list(module.named_modules(remove_duplicate=False))):
        model = _innermost(pretrained, path)
        if model is not None and path in holders:
            calls.append((path, _bound(pretrained_init(model), child)))
        elif model is None and path in owners:
            reset = getattr(child, "reset_parameters", None)
            if reset is None:
                missing.append(path or "<the LightningModule>")
            else:
                calls.append((path, reset))
    if missing:
        raise RuntimeSetupError(
            f"The module was created on the meta device, but {sorted(set(missing))} define no `reset_parameters()` "
            "to initialise their own parameters and buffers on the rank that holds them. Add one "
            "(it must set only that module's direct tensors), or create the module normally."
        )
    return calls


def _pretrained_models(module: nn.Module) -> dict[str, nn.Module]:
    """Path -> every transformers ``PreTrainedModel`` inside ``module`` (none without transformers
    imported: a model cannot be one then)."""
    transformers = sys.modules.get("transformers")
    base = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
    if base is None:
        return {}
    return {path: child for path, child in module.named_modules() if isinstance(child, base)}


def _innermost(pretrained: Mapping[str, nn.Module], path: str) -> nn.Module | None:
    """The innermost ``PreTrainedModel`` whose subtree holds the module at ``path`` (its own
    ``_init_weights`` knows its layers: a composite model's sub-models have their own)."""
    for prefix in reversed(_prefixes(path)):
        if prefix in pretrained:
            return pretrained[prefix]
    return None


def _prefixes(path: str) -> list[str]:
    """``"a.b.c"`` -> ``["", "a", "a.b", "a.b.c"]``: the module and its ancestors, outermost first."""
    parts = path.split(".") if path else []
    return ["", *(".".join(parts[: i + 1]) for i in range(len(parts)))]


def _bound(init: Callable[[nn.Module], None], child: nn.Module) -> Callable[[], None]:
    return lambda: init(child)
