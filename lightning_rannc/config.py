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

from lightning_rannc.plan.devices import get_device, parse_bytes
from lightning_rannc.plan.plan import SCHEDULES

__all__ = ["RaNNCConfig"]

_ENV_PREFIX = "RANNC_"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(kw_only=True)
class RaNNCConfig:
    """Options of ``RaNNCStrategy``; see its docstring for each one's meaning."""

    pipeline_stages: int | str | None = "auto"
    """Ranks per pipeline (S); ``"auto"``: the planner's choice; ``None``: one pipeline over all devices."""
    micro_batches: int | str = 4
    """Micro-batches per batch; ``"auto"``: the planner's choice."""
    max_micro_batches: int = 64
    """With ``micro_batches="auto"``: the most micro-batches the planner may choose."""
    min_micro_batch_size: int = 1
    """With ``micro_batches="auto"``: the fewest samples per micro-batch."""
    schedule: str = "auto"
    """``"auto"``, ``"gpipe"``, ``"1f1b"`` or ``"interleaved_1f1b"``."""
    virtual_stages: int = 1
    """Stages per rank for ``"interleaved_1f1b"``."""
    zero_bubble: bool = False
    """Run the 1F1B schedules as zero bubble (backward split into input and weight gradients)."""
    activation_checkpointing: bool | str = False
    """Recompute stages' activations in backward: ``True`` every stage, ``"auto"`` only the stages
    that need it to fit the memory limit."""
    memory_limit: int | str | None = None
    """Bytes per device the plan may use (``"80GB"``, ``"16GiB"``); ``None``: the CUDA device's
    total memory, unlimited on CPU."""
    memory_margin: float = 0.1
    """Share of the memory limit kept free for what the model does not predict."""
    device_preset: str | None = None
    """Device description for link bandwidths and analytic costs (``"h100"``, ``"a100"``,
    ``"v100"``, ``"cpu"``); ``None``: from the device's name."""
    max_blocks: int = 64
    """At most this many blocks are profiled; stages are cut only between blocks."""
    profile_repeats: int = 3
    """Timed runs per block when profiling."""
    deployment: str | None = None
    """A plan file to reuse, or to write at the first run."""
    state_dict_type: str = "full"
    """Checkpoints: ``"full"`` (one file, gathered on rank 0) or ``"sharded"`` (a directory, each
    rank writing its own tensors)."""
    profile_cache: str | None = None
    """Directory keeping measured block costs between runs; ``None``: kept for this process only."""
    measure_links: bool = True
    """Time point-to-point and all-reduce transfers at setup and plan with the measured bandwidths."""
    trace: str | None = None
    """Path of a Chrome trace of the runtime's events (per rank: forward and backward of each
    micro-batch, collectives, optimizer step), written by rank 0 at the end of ``fit``."""
    trace_steps: int = 5
    """Training steps the trace records (the first ones)."""
    verify: bool = False
    """Run the first step unpartitioned too and compare loss and gradients (RaNNC's
    ``verify_partitioning``); raise on every rank above ``verify_tolerance``."""
    verify_tolerance: float = 1e-3
    """Largest relative difference ``verify`` accepts (max abs difference / max abs value)."""
    terminate_on_nan: bool = False
    """Stop training (every rank raises) at the first step whose loss is NaN or infinite;
    ``False``: as Lightning, the value is logged and training goes on."""
    pipelined_evaluation: bool = True
    """Run validation, test and predict steps forward only through the training pipeline;
    ``False``: gather the whole module on every rank for them."""
    fault_timeout: float = 60.0
    """Seconds a rank may show no sign of life before every rank stops (a rank that raises stops
    the others at once)."""
    timeout: float = 1800.0
    """Seconds a collective may wait."""

    def __post_init__(self) -> None:
        positive = ("virtual_stages", "max_blocks", "profile_repeats", "max_micro_batches", "min_micro_batch_size")
        for name in (*positive, "trace_steps"):
            _check_positive(name, getattr(self, name))
        if self.pipeline_stages not in (None, "auto"):
            _check_positive("pipeline_stages", self.pipeline_stages, "or 'auto' or None")
        if self.micro_batches != "auto":
            _check_positive("micro_batches", self.micro_batches, "or 'auto'")
        if self.schedule not in ("auto", *SCHEDULES):
            raise ValueError(f"RaNNCStrategy(schedule={self.schedule!r}): valid values are {['auto', *SCHEDULES]}.")
        if self.zero_bubble and self.schedule == "gpipe":
            raise ValueError(
                "RaNNCStrategy(zero_bubble=True, schedule='gpipe'): zero bubble refines 1F1B schedules; "
                "use schedule='auto', '1f1b' or 'interleaved_1f1b'."
            )
        if self.activation_checkpointing not in (True, False, "auto"):
            raise ValueError(
                f"RaNNCStrategy(activation_checkpointing={self.activation_checkpointing!r}): use True, False or 'auto'."
            )
        if self.memory_limit is not None:
            parse_bytes(self.memory_limit)  # raises with the accepted spellings
        if not 0 <= self.memory_margin < 1:
            raise ValueError(f"RaNNCStrategy(memory_margin={self.memory_margin!r}): use a fraction in [0, 1).")
        if self.device_preset is not None:
            get_device(self.device_preset)
        if self.state_dict_type not in ("full", "sharded"):
            raise ValueError(f"RaNNCStrategy(state_dict_type={self.state_dict_type!r}): use 'full' or 'sharded'.")
        if self.fault_timeout <= 0:
            raise ValueError(f"RaNNCStrategy(fault_timeout={self.fault_timeout!r}): use positive seconds.")
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


def _check_positive(option: str, value: Any, alternatives: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        also = f" {alternatives}" if alternatives else ""
        raise ValueError(f"RaNNCStrategy({option}={value!r}): {option} must be a positive integer{also}.")


def _parse(text: str, hint: Any, variable: str) -> Any:
    """``text`` as the first type of ``hint`` (in declaration order) that reads it."""
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in kinds and text.strip().lower() in ("", "none", "null"):
        return None
    for kind in (k for k in kinds if k is not type(None)):
        try:
            return _parse_as(text, kind)
        except ValueError:
            continue
    names = " or ".join(k.__name__ for k in kinds if k is not type(None))
    raise ValueError(f"{variable}={text!r} is not a valid {names}.")


def _parse_as(text: str, kind: type) -> Any:
    if kind is bool:
        lowered = text.strip().lower()
        if lowered not in _TRUE + _FALSE:
            raise ValueError
        return lowered in _TRUE
    return kind(text)
