"""The strategy's options, each declared once: its name, type, default and meaning.

``RaNNCConfig`` is what ``RaNNCStrategy`` is configured with. Everything else that names an
option derives from the fields here or is checked against them by ``tests/unit/test_options.py``:
the strategy's signature and docstring, the options table of the README (``options_table``),
the environment overrides, the engine's and the search's settings, and the CLI's defaults.

It works as an OmegaConf structured config (``OmegaConf.structured(RaNNCConfig)`` type-checks
YAML values), and every field can be overridden by an environment variable ``RANNC_<FIELD>``
(``RANNC_MICRO_BATCHES=8``), as RaNNC's options are. The environment wins over arguments, so a
launch script can tune a run without editing code.
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
from lightning_rannc.plan.plan import SCHEDULES, ZERO_STAGES

__all__ = ["RaNNCConfig", "option_docs", "options_table", "strategy_docstring"]

_ENV_PREFIX = "RANNC_"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
START_METHODS = ("popen", "spawn", "fork", "forkserver")


def _option(default: Any, doc: str, shown: str | None = None) -> Any:
    """A field with its meaning (``doc``, markdown) and, where the plain value would mislead
    (``None`` standing for "from the device"), the default as the README shows it (``shown``)."""
    return dataclasses.field(default=default, metadata={"doc": doc, "shown": shown})


@dataclass(kw_only=True)
class RaNNCConfig:
    """Options of ``RaNNCStrategy``: ``RaNNCStrategy(**vars(config))`` or ``RaNNCStrategy(micro_batches=8)``."""

    pipeline_stages: int | str | None = _option(
        "auto",
        'ranks per pipeline (S); the devices form `devices / S` data-parallel replicas of it. `"auto"`: the '
        "layout with the most samples per second that fits `memory_limit`, planned at setup from the first "
        "training batch; `None`: one pipeline over all devices",
    )
    micro_batches: int | str = _option(
        "auto",
        '`"auto"`: the planner\'s choice, a divisor of the batch (the fewest that fit for one stage, the fastest '
        "predicted for a pipeline); a number: micro-batches per batch, and a batch it does not divide runs with "
        "the nearest count that does (10 samples: 5 x 2)",
    )
    max_micro_batches: int = _option(
        64,
        'with `micro_batches="auto"`: the most micro-batches the planner tries first; when no plan fits, it tries '
        "every count down to `min_micro_batch_size` samples before it refuses",
    )
    min_micro_batch_size: int = _option(1, 'with `micro_batches="auto"`: the fewest samples per micro-batch')
    schedule: str = _option(
        "auto",
        '`"gpipe"`, `"1f1b"`, `"interleaved_1f1b"`, `"zbv"` (torch\'s `ScheduleZBVZeroBubble`: two stages a rank '
        'placed in a V, rank `r` of `S` running stages `r` and `2S - 1 - r`, as zero bubble); `"auto"`: 1F1B when '
        "`micro_batches >= stages`, else GPipe, and interleaved or ZB-V where the planner predicts them faster",
    )
    virtual_stages: int | str = _option(
        "auto",
        'stages per rank (interleaved 1F1B, a number forces it); `"auto"`: 1, or 2, 3 or 4 where the planner '
        "predicts interleaving faster (on the CPU preset by 10%) and every batch of the epoch, a smaller last one "
        "too, splits into its whole rounds of `pipeline_stages` micro-batches",
    )
    zero_bubble: bool | str = _option(
        "auto",
        "run the 1F1B schedule (plain or interleaved) as zero bubble (torch's `ScheduleInterleavedZeroBubble`, "
        "ZB1P): each backward is split into the input gradient, sent on at once, and the weight gradient, run "
        "where the pipeline would idle; simulated in torch's order, the two passes half the backward each plus "
        "the split's walks of the autograd graph (the first stage's whole backward in its weight pass), "
        'activations held until the weight pass; `"auto"`: where the planner predicts it faster (on the CPU '
        "preset by 10%), no stage recomputes, and every batch splits into its rounds, as for `virtual_stages`",
    )
    zero_stage: int | str = _option(
        "auto",
        "optimizer state of the replicas of a stage: `1` split over them (ZeRO-1: gradients all-reduced, each "
        "updates its share, then broadcasts it), `2` split with the gradients (ZeRO-2: each gradient is reduced "
        "to the replica that updates it: less traffic than ZeRO-1's all-reduce), `3` split with the parameters too "
        "(ZeRO-3: each parameter lives on one replica, which the others gather it from wherever a micro-batch "
        "uses it, reducing its gradient back: ZeRO-1's traffic of a step, in every micro-batch; not with zero "
        'bubble), `0` whole on each (as `ddp`: no broadcast, more memory); `"auto"`: per plan, the fastest that '
        "fits (ZeRO-3 only for one stage and the next shallower pipeline than the best plan without it, or where "
        "nothing else fits)",
    )
    offload_optimizer: bool | str = _option(
        "auto",
        "keep the optimizer state in host memory and step there (each step copies the parameters and gradients "
        'a rank updates to the host and the new parameters back); `"auto"`: only for a layout whose state does '
        "not fit on the devices otherwise (offloading only adds transfers), never on CPU devices (their memory is "
        "the host's); not with `16-mixed`",
    )
    activation_checkpointing: bool | str = _option(
        "auto",
        'recompute activations in backward (`torch.utils.checkpoint`, non-reentrant): `"auto"`, only the stages '
        "that need it to fit `memory_limit`, and of those only the first layers that must; `True`: every stage "
        "whole; `False`: none",
    )
    memory_limit: int | str | None = _option(
        None,
        'bytes per device the plan may use (`"80GB"`, `"16GiB"`, an int); `None`: the CUDA device\'s memory, '
        "unlimited on CPU. Nothing fits: `PlanError` naming the device count or memory per device that would",
    )
    memory_margin: float = _option(0.1, "share of `memory_limit` kept free")
    device_preset: str | None = _option(
        None,
        '`"h100"`, `"a100"`, `"v100"`, `"cpu"`: link bandwidths for predictions, FLOP rates for meta-device modules',
        shown="from the device",
    )
    deployment: str | None = _option(
        None,
        "a plan file (RaNNC's deployment): used when it exists, with no profiling or search, and refused with "
        "the differences if it was made for another graph, layout or batch size; written otherwise",
    )
    state_dict_type: str = _option(
        "full",
        'checkpoints: `"full"`, one file gathered on rank 0 that plain Lightning loads; `"sharded"`, a '
        "directory where every rank writes the tensors it holds (no gather; `python -m lightning_rannc "
        "consolidate DIR FILE` makes one file)",
    )
    profile_cache: str | None = _option(
        None,
        "directory keeping measured block costs, keyed by graph, micro-batch shapes, blocks, device and torch "
        "version, so the next run skips profiling; `None`: kept in memory for this process (the setup-time "
        "layout choice and the first batch share it)",
    )
    measure_links: bool = _option(
        True,
        "time point-to-point transfers (within and across nodes) and an all-reduce at setup (about 0.1 s), and "
        "plan with the measured latency and bandwidths instead of the preset's",
    )
    max_blocks: int = _option(
        128,
        "the graph is grouped into at most this many blocks; stages are cut only between blocks (finer than "
        "layers, so that a GPT-3-shaped model of 96 layers on 64 stages or more is cut between layers)",
    )
    profile_repeats: int = _option(3, "timed runs per block when profiling")
    trace: str | None = _option(
        None,
        "path of a Chrome/Perfetto trace of what each rank really did in the first `trace_steps` steps: every "
        "stage's forward and backward of each micro-batch, the waits for its sends and receives, the collectives "
        "after the schedule, the optimizer step; written by rank 0 at the end of `fit` (RaNNC's `trace_events`); "
        "`python -m lightning_rannc show plan.json --measured trace.json` prints each stage's predicted and "
        "measured forward and backward (medians), and with `--chart step.png` draws a step of it below the "
        "prediction",
    )
    trace_steps: int = _option(5, "training steps `trace` records")
    verify: bool = _option(
        False,
        "RaNNC's `verify_partitioning`: the first step also runs unpartitioned on each rank's batch, with the "
        "same random streams; the loss and every gradient are compared and the largest relative difference is "
        "logged; above `verify_tolerance` every rank raises, naming the parameter",
    )
    verify_tolerance: float = _option(
        1e-3, "the largest relative difference (max abs difference / max abs value) `verify` accepts", shown="`1e-3`"
    )
    terminate_on_nan: bool = _option(
        False,
        "raise on every rank at the first step whose loss is NaN or infinite; `False`: as Lightning, the value "
        "is logged and training goes on",
    )
    pipelined_evaluation: bool = _option(
        True,
        "run `validation_step`, `test_step`, `predict_step` forward only through the training pipeline; "
        "`False`: gather the whole module on every rank for each evaluation loop (ignored for a module created "
        "on the meta device)",
    )
    fault_timeout: float = _option(
        60.0,
        "seconds a rank may show no sign of life (killed, frozen) before every rank stops; a rank that raises "
        "stops the others within about a second",
        shown="`60`",
    )
    stall_timeout: float | None = _option(
        None,
        "seconds a training or evaluation step may run before every rank stops, naming the line where this rank "
        "waits (a collective that never completes keeps its rank alive, so `fault_timeout` misses it)",
        shown="20x the median step, at least 300 s, from the 4th step",
    )
    process_group_backend: str | None = _option(None, '`"gloo"` or `"nccl"`', shown="device's default")
    timeout: float = _option(1800.0, "seconds a collective may wait before the process group fails", shown="`1800`")
    start_method: str = _option(
        "popen",
        '`"popen"` re-runs the script per rank (like `ddp`); `"spawn"`/`"fork"`/`"forkserver"` spawn',
    )

    def __post_init__(self) -> None:
        positive = ("max_blocks", "profile_repeats", "max_micro_batches", "min_micro_batch_size")
        for name in (*positive, "trace_steps"):
            _check_positive(name, getattr(self, name))
        if self.pipeline_stages not in (None, "auto"):
            _check_positive("pipeline_stages", self.pipeline_stages, "or 'auto' or None")
        if self.micro_batches != "auto":
            _check_positive("micro_batches", self.micro_batches, "or 'auto'")
        if self.virtual_stages != "auto":
            _check_positive("virtual_stages", self.virtual_stages, "or 'auto'")
        _check_choice("schedule", self.schedule, ("auto", *SCHEDULES))
        _check_choice("zero_bubble", self.zero_bubble, ("auto", True, False))
        _check_choice("zero_stage", self.zero_stage, ("auto", *ZERO_STAGES))
        _check_choice("offload_optimizer", self.offload_optimizer, ("auto", True, False))
        if self.zero_bubble is True and self.schedule == "gpipe":
            raise ValueError(
                "RaNNCStrategy(zero_bubble=True, schedule='gpipe'): zero bubble refines 1F1B schedules; "
                "use schedule='auto', '1f1b' or 'interleaved_1f1b'."
            )
        if self.schedule == "zbv" and (self.zero_bubble is False or self.virtual_stages not in ("auto", 2)):
            raise ValueError(
                f"RaNNCStrategy(schedule='zbv', zero_bubble={self.zero_bubble!r}, virtual_stages="
                f"{self.virtual_stages!r}): ZB-V runs two stages per rank as zero bubble; leave zero_bubble and "
                "virtual_stages to 'auto' (or set True and 2), or use schedule='interleaved_1f1b'."
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
        _check_choice("state_dict_type", self.state_dict_type, ("full", "sharded"))
        _check_choice("start_method", self.start_method, START_METHODS)
        for name in ("fault_timeout", "stall_timeout"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"RaNNCStrategy({name}={getattr(self, name)!r}): use positive seconds.")
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


def option_docs() -> dict[str, str]:
    """Each option's meaning, by name, in declaration order."""
    return {f.name: f.metadata["doc"] for f in dataclasses.fields(RaNNCConfig)}


def options_table() -> str:
    """The README's options table (markdown), one row per option."""
    rows = ["| `RaNNCStrategy(...)` | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(RaNNCConfig):
        default = f'"{f.default}"' if isinstance(f.default, str) else repr(f.default)
        rows.append(f"| `{f.name}` | {f.metadata['shown'] or f'`{default}`'} | {f.metadata['doc']} |")
    return "\n".join(rows)


def strategy_docstring() -> str:
    """``RaNNCStrategy.__init__``'s docstring: each option's meaning, as declared here."""
    lines = ["Pipeline-parallel training of an unmodified LightningModule.", "", "Args:"]
    lines += [f"    {name}: {doc}." for name, doc in option_docs().items()]
    lines += [
        "    accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin: set by the",
        "        Trainer, as for any Lightning strategy.",
        "",
        "Every option is a field of ``RaNNCConfig``, and can also come from an environment variable",
        "``RANNC_<OPTION>`` (``RANNC_MICRO_BATCHES=8``), which wins over the argument.",
    ]
    return "\n".join(lines)


def _check_positive(option: str, value: Any, alternatives: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        also = f" {alternatives}" if alternatives else ""
        raise ValueError(f"RaNNCStrategy({option}={value!r}): {option} must be a positive integer{also}.")


def _check_choice(option: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"RaNNCStrategy({option}={value!r}): valid values are {list(choices)}.")


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
