"""The strategy's options as one validated dataclass, overridable from the environment.

``RaNNCConfig`` is what ``RaNNCStrategy`` is configured with. It works as an OmegaConf
structured config (``OmegaConf.structured(RaNNCConfig)`` type-checks YAML values), and every
field can be overridden by an environment variable ``RANNC_<FIELD>`` (``RANNC_MICRO_BATCHES=8``),
as RaNNC's options are. The environment wins over arguments, so a launch script can tune a
run without editing code.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lightning_rannc.plan.plan import SCHEDULES

__all__ = ["RaNNCConfig"]

_ENV_PREFIX = "RANNC_"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(kw_only=True)
class RaNNCConfig:
    """Options of ``RaNNCStrategy``; see its docstring for each one's meaning."""

    pipeline_stages: int | None = None
    """Ranks per pipeline (S); ``None``: one pipeline over all devices."""
    micro_batches: int = 4
    """Micro-batches per batch."""
    schedule: str = "auto"
    """``"auto"``, ``"gpipe"``, ``"1f1b"`` or ``"interleaved_1f1b"``."""
    virtual_stages: int = 1
    """Stages per rank for ``"interleaved_1f1b"``."""
    activation_checkpointing: bool = False
    """Recompute each stage's activations in backward."""
    max_blocks: int = 64
    """At most this many blocks are profiled; stages are cut only between blocks."""
    profile_repeats: int = 3
    """Timed runs per block when profiling."""
    deployment: str | None = None
    """A plan file to reuse, or to write at the first run."""
    timeout: float = 1800.0
    """Seconds a collective may wait."""

    def __post_init__(self) -> None:
        for name in ("micro_batches", "virtual_stages", "max_blocks", "profile_repeats"):
            _check_positive(name, getattr(self, name))
        if self.pipeline_stages is not None:
            _check_positive("pipeline_stages", self.pipeline_stages)
        if self.schedule not in ("auto", *SCHEDULES):
            raise ValueError(f"RaNNCStrategy(schedule={self.schedule!r}): valid values are {['auto', *SCHEDULES]}.")
        if self.timeout <= 0:
            raise ValueError(f"RaNNCStrategy(timeout={self.timeout!r}): timeout must be positive seconds.")

    def with_env_overrides(self, environ: Mapping[str, str] | None = None) -> RaNNCConfig:
        """A copy with every ``RANNC_<FIELD>`` variable of ``environ`` applied (and validated)."""
        environ = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(self)}
        hints = typing.get_type_hints(type(self))
        unknown = sorted(
            k for k in environ if k.startswith(_ENV_PREFIX) and k[len(_ENV_PREFIX) :].lower() not in fields
        )
        if unknown:
            raise ValueError(
                f"Unknown lightning_rannc environment variable(s) {unknown}; valid: "
                f"{[_ENV_PREFIX + name.upper() for name in fields]}."
            )
        changes = {
            name: _parse(environ[_ENV_PREFIX + name.upper()], hints[name], _ENV_PREFIX + name.upper())
            for name in fields
            if _ENV_PREFIX + name.upper() in environ
        }
        return dataclasses.replace(self, **changes)


def _check_positive(option: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"RaNNCStrategy({option}={value!r}): {option} must be a positive integer.")


def _parse(text: str, hint: Any, variable: str) -> Any:
    kinds = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
    if type(None) in kinds and text.strip().lower() in ("", "none", "null"):
        return None
    kind = next(k for k in kinds if k is not type(None))
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered not in _TRUE + _FALSE:
                raise ValueError
            return lowered in _TRUE
        return kind(text)
    except ValueError:
        raise ValueError(f"{variable}={text!r} is not a valid {kind.__name__}.") from None
