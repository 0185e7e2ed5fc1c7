"""Capture a LightningModule's ``training_step`` as one exported graph.

``torch.export`` (non-strict) traces ``training_step(batch, batch_idx)`` as a function of the
batch's tensor leaves, at the micro-batch size. Lightning's ``self.log`` cannot run inside a
traced graph, so it is replaced during the trace by a recorder: the logged tensors become graph
outputs, and the strategy replays the ``log`` calls with the pipelined values after each step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from lightning_rannc._utils import where_defined
from lightning_rannc.errors import CaptureError

__all__ = [
    "LoggedValue",
    "CapturedStep",
    "capture_training_step",
    "flatten_batch",
    "fake_module_state",
    "module_tensors",
]

log = logging.getLogger("lightning_rannc")


@dataclass(kw_only=True)
class LoggedValue:
    """One ``self.log`` call made by the training step, to be replayed after each step."""

    name: str
    """The metric name given to ``self.log``."""
    kwargs: dict[str, Any]
    """Every other argument of the call (``prog_bar``, ``on_epoch``, ...)."""
    output_index: int | None
    """Position of the value among the graph's outputs; ``None`` for a Python constant."""
    constant: float | int | None = None
    """The value, when the user logged a Python number instead of a tensor."""


@dataclass(kw_only=True)
class CapturedStep:
    """The exported training step and what is needed to run it and replay its side effects."""

    program: ExportedProgram | None
    """The exported program; dropped once the stage is built (it references every tensor)."""
    batch_spec: TreeSpec
    """Structure of the batch; the graph's user inputs are its flattened leaves in order."""
    microbatch_size: int
    logged: list[LoggedValue]
    extra_keys: list[str]
    """Keys of the returned dict besides ``"loss"`` whose tensors are graph outputs."""
    returns_dict: bool
    tensors: dict[str, torch.Tensor]
    """Canonical name -> the module's own parameter/buffer object (or a lifted constant)."""
    aliases: dict[str, str]
    """Every parameter/buffer name of the module -> its canonical name (tied weights share one)."""
    state_dict_keys: list[str]
    """Keys of ``module.state_dict()`` in order, to rebuild a full state dict later."""
    placeholder_names: dict[str, str] = field(default_factory=dict)
    """Graph placeholder name -> canonical tensor name, for parameters, buffers and constants."""
    written_buffers: list[str] = field(default_factory=list)
    """Buffers the step updates in place (BatchNorm running statistics), by canonical name."""

    def forget_tensors_except(self, keep: set[str]) -> None:
        """Drop the program and every tensor not in ``keep``, so that other stages' memory can be freed."""
        self.program = None
        self.tensors = {name: t for name, t in self.tensors.items() if name in keep}


def flatten_batch(batch: Any, where: str) -> tuple[list[torch.Tensor], TreeSpec]:
    """Flatten a batch into tensor leaves, refusing leaves the graph cannot take as inputs."""
    leaves, spec = tree_flatten(batch)
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise CaptureError(
                f"The batch passed to `training_step` ({where}) holds a {type(leaf).__name__} leaf "
                f"({leaf!r:.60}). RaNNCStrategy feeds batches through the pipeline as tensors only: "
                "convert it to a tensor in your DataLoader's collate_fn, or drop it from the batch."
            )
    if not leaves:
        raise CaptureError(f"The batch passed to `training_step` ({where}) holds no tensors.")
    return leaves, spec


class _LogRecorder:
    """Stands in for ``LightningModule.log`` while the step is traced."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.calls: list[tuple[str, Any, dict[str, Any]]] = []
        # What the step returned. Kept here, not on the traced module: export restores the
        # module's attributes after tracing.
        self.output_info: dict[str, Any] = {}
        self.counter_reads: set[str] = set()

    def __call__(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if args:
            raise CaptureError(
                f"`self.log({name!r}, ...)` in {self.where} passes options positionally; "
                "pass them by keyword (e.g. `prog_bar=True`) so they can be replayed."
            )
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise CaptureError(
                    f"`self.log({name!r}, ...)` in {self.where} logs a tensor of shape "
                    f"{tuple(value.shape)}; Lightning logs scalars only. Reduce it (e.g. `.mean()`)."
                )
            # Detach right where the value is made, so the graph keeps it out of backward.
            value = value.detach()
        elif not isinstance(value, (int, float)):
            raise CaptureError(
                f"`self.log({name!r}, ...)` in {self.where} logs a {type(value).__name__}; "
                "RaNNCStrategy replays tensor or number values only so far."
            )
        self.calls.append((name, value, kwargs))


@contextlib.contextmanager
def _recording_logs(module: nn.Module, recorder: _LogRecorder) -> Iterator[None]:
    # An instance attribute shadows the method; `log_dict` calls `self.log`, so it is covered too.
    module.log = recorder  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        del module.log


def _split_step_output(output: Any, where: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return the loss and the other tensors of what ``training_step`` returned."""
    extras: dict[str, torch.Tensor] = {}
    if isinstance(output, Mapping):
        if "loss" not in output:
            raise CaptureError(
                f"`training_step` ({where}) returned a dict without a 'loss' key "
                f"(keys: {sorted(output)}). Return the loss tensor, or a dict with 'loss'."
            )
        extras = {k: v.detach() for k, v in output.items() if k != "loss" and _is_scalar(v)}
        output = output["loss"]
    if output is None:
        raise CaptureError(
            f"`training_step` ({where}) returned None. RaNNCStrategy runs every micro-batch through "
            "the pipeline, so skipping a step by returning None is not supported: return the loss."
        )
    if not isinstance(output, torch.Tensor):
        raise CaptureError(
            f"`training_step` ({where}) returned a {type(output).__name__}; return the loss tensor "
            "or a dict with a 'loss' tensor."
        )
    if output.numel() != 1:
        raise CaptureError(
            f"`training_step` ({where}) returned a loss of shape {tuple(output.shape)}; "
            "the loss must be a scalar (reduce it, e.g. with `.mean()`)."
        )
    return output.reshape(()), extras


def _is_scalar(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.numel() == 1


class _WatchedIndex(int):
    """The ``batch_idx`` handed to the traced step: an int that notes being used."""

    reads: set[str]

    def __new__(cls, value: int, reads: set[str]) -> _WatchedIndex:
        index = super().__new__(cls, value)
        index.reads = reads
        return index


def _noting(name: str) -> Any:
    method = getattr(int, name)

    def noted(self: _WatchedIndex, *args: Any) -> Any:
        self.reads.add("batch_idx")
        return method(int(self), *args)

    return noted


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__mod__", "__floordiv__",
              "__truediv__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__index__",
              "__float__", "__format__", "__str__", "__repr__", "__hash__"):  # fmt: skip
    setattr(_WatchedIndex, _name, _noting(_name))


class _WatchedTrainer:
    """Stands in for ``module.trainer`` while tracing and notes reads of per-step counters."""

    _COUNTERS = ("current_epoch", "global_step")

    def __init__(self, trainer: Any, reads: set[str]) -> None:
        object.__setattr__(self, "_trainer", trainer)
        object.__setattr__(self, "_reads", reads)

    def __getattr__(self, name: str) -> Any:
        if name in self._COUNTERS:
            self._reads.add(name)
        return getattr(self._trainer, name)


@contextlib.contextmanager
def _watching_counters(module: nn.Module, reads: set[str]) -> Iterator[None]:
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        yield
        return
    module._trainer = _WatchedTrainer(trainer, reads)  # type: ignore[assignment]
    try:
        yield
    finally:
        module._trainer = trainer


class _TrainingStep(nn.Module):
    """The function that is exported: batch leaves in, (loss, logged values, extras) out."""

    def __init__(self, module: nn.Module, spec: TreeSpec, where: str) -> None:
        super().__init__()
        self.module = module
        self.spec = spec
        self.where = where
        self.recorder = _LogRecorder(where)

    def forward(self, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = tree_unflatten(list(leaves), self.spec)
        self.recorder.calls.clear()
        reads = self.recorder.counter_reads
        with _recording_logs(self.module, self.recorder), _watching_counters(self.module, reads):
            output = self.module.training_step(batch, _WatchedIndex(0, reads))  # type: ignore[operator]
        loss, extras = _split_step_output(output, self.where)
        self.recorder.output_info.update(returns_dict=isinstance(output, Mapping), extra_keys=list(extras))
        logged = [v for _, v, _ in self.recorder.calls if isinstance(v, torch.Tensor)]
        return (loss, *logged, *extras.values())


def _canonical_names(module: nn.Module) -> tuple[dict[int, str], dict[str, str], dict[str, torch.Tensor]]:
    """``id -> canonical name``, ``name -> canonical name`` and ``canonical name -> tensor``."""
    first_name: dict[int, str] = {}
    aliases: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        aliases[name] = first_name.setdefault(id(tensor), name)
        tensors.setdefault(aliases[name], tensor)
    return first_name, aliases, tensors


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical name -> the module's parameter or buffer object (tied tensors once)."""
    return _canonical_names(module)[2]


def _logged_values(calls: list[tuple[str, Any, dict[str, Any]]]) -> list[LoggedValue]:
    logged, index = [], 1
    for name, value, kwargs in calls:
        if isinstance(value, torch.Tensor):
            logged.append(LoggedValue(name=name, kwargs=kwargs, output_index=index))
            index += 1
        else:
            logged.append(LoggedValue(name=name, kwargs=kwargs, output_index=None, constant=value))
    return logged


def _tensor_names(wrapper: _TrainingStep, program: ExportedProgram) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Map each lifted placeholder to a canonical name and the real tensor behind it."""
    from torch.export.graph_signature import InputKind

    # Every parameter/buffer, used by the graph or not: unused ones still belong in checkpoints.
    by_id, _, tensors = _canonical_names(wrapper.module)
    placeholders: dict[str, str] = {}
    for spec in program.graph_signature.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            tensor = (
                wrapper.get_parameter(spec.target)
                if spec.kind == InputKind.PARAMETER
                else wrapper.get_buffer(spec.target)
            )
            name = by_id[id(tensor)]
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            tensor = program.constants[spec.target]
            name = f"_rannc_constant_{len(tensors)}"
        elif spec.kind == InputKind.USER_INPUT:
            continue
        else:
            raise CaptureError(
                f"`training_step` ({wrapper.where}) uses a {spec.kind.name} input, which is not supported."
            )
        placeholders[spec.arg.name] = name
        tensors[name] = tensor
    return placeholders, tensors


# Composite ops whose schemas do not mark the running statistics they update in place
# (op -> argument positions); the training IR keeps them whole.
_HIDDEN_WRITES: dict[str, tuple[int, ...]] = {
    "aten.batch_norm.default": (3, 4),
    "aten.instance_norm.default": (3, 4),
}


def _written_buffers(program: ExportedProgram, placeholders: dict[str, str], where: str) -> list[str]:
    """Buffers the step updates in place (BatchNorm running statistics); parameters may not be."""
    from torch.export.graph_signature import OutputKind

    for spec in program.graph_signature.output_specs:
        if spec.kind != OutputKind.USER_OUTPUT:
            raise CaptureError(f"`training_step` ({where}) produces a {spec.kind.name} output, which is not supported.")
    parameters = {s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "PARAMETER"}
    written: dict[str, None] = {}
    for node in program.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        hidden = _HIDDEN_WRITES.get(str(node.target), ())
        for position, (argument, value) in enumerate(zip(schema.arguments, node.args)):
            is_write = position in hidden or (argument.alias_info is not None and argument.alias_info.is_write)
            if not (is_write and isinstance(value, torch.fx.Node) and value.name in placeholders):
                continue
            if value.name in parameters:
                raise CaptureError(
                    f"`training_step` ({where}) changes the parameter `{placeholders[value.name]}` in place; "
                    "only the optimizer may change parameters. Compute a new tensor instead."
                )
            written[placeholders[value.name]] = None
    return list(written)


@contextlib.contextmanager
def fake_module_state(module: nn.Module, device: torch.device) -> Iterator[Any]:
    """Swap every parameter and buffer of ``module`` for a fake tensor on ``device`` (no memory).

    Lets the step be captured again (another batch shape) after other stages' tensors were
    freed: export needs every tensor on one device, and fake tensors cost nothing. Tied tensors
    stay tied. Yields the fake mode; batches must be made fake with ``mode.from_tensor``.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes: dict[int, torch.Tensor] = {}
    saved: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    for owner in module.modules():
        for store in (owner._parameters, owner._buffers):
            for key, tensor in list(store.items()):
                if tensor is None:
                    continue
                if id(tensor) not in fakes:
                    with mode:
                        fake = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device)
                    is_param = isinstance(tensor, nn.Parameter)
                    fakes[id(tensor)] = nn.Parameter(fake, requires_grad=tensor.requires_grad) if is_param else fake
                saved.append((store, key, tensor))
                store[key] = fakes[id(tensor)]  # type: ignore[assignment]
    try:
        yield mode
    finally:
        for store, key, tensor in saved:
            store[key] = tensor  # type: ignore[assignment]


def _warn_fixed_counters(names: list[str], where: str) -> None:
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(
        f"`training_step` ({where}) reads {', '.join(names)}. RaNNCStrategy captures the step once, so "
        "every step uses the value seen at capture (batch_idx=0, the first step's epoch and step): "
        "anything computed from it is fixed. Move such logic to a hook (e.g. `on_train_batch_start`) "
        "or put the value in the batch."
    )


def capture_training_step(module: nn.Module, microbatch: Any) -> CapturedStep:
    """Export ``module.training_step`` for one micro-batch.

    Args:
        module: the user's LightningModule, on its training device, in train mode.
        microbatch: a batch of the micro-batch size, structured as the DataLoader yields it.

    Returns:
        The captured step; its graph's user inputs are the micro-batch's tensor leaves in order.

    Raises:
        CaptureError: the step or the batch cannot be captured; the message names the user's code.
    """
    where = where_defined(type(module).training_step)  # type: ignore[attr-defined]
    leaves, spec = flatten_batch(microbatch, where)
    wrapper = _TrainingStep(module, spec, where)
    try:
        program = torch.export.export(wrapper, tuple(leaves), strict=False)
    except CaptureError:
        raise
    except Exception as err:  # export's own errors are long; keep them reachable at debug level
        log.debug("torch.export failed", exc_info=True)
        raise CaptureError(
            f"Could not capture `{type(module).__name__}.training_step` ({where}) as a graph: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. RaNNCStrategy "
            "needs a step without data-dependent Python control flow or `.item()`/`.tolist()` calls; "
            "set the `lightning_rannc` logger to DEBUG for the full torch.export report."
        ) from err
    placeholders, tensors = _tensor_names(wrapper, program)
    written = _written_buffers(program, placeholders, where)
    if wrapper.recorder.counter_reads:
        _warn_fixed_counters(sorted(wrapper.recorder.counter_reads), where)
    _, aliases, _ = _canonical_names(module)
    return CapturedStep(
        program=program,
        batch_spec=spec,
        microbatch_size=int(leaves[0].shape[0]) if leaves[0].dim() else 1,
        logged=_logged_values(wrapper.recorder.calls),
        extra_keys=wrapper.recorder.output_info["extra_keys"],
        returns_dict=wrapper.recorder.output_info["returns_dict"],
        tensors=tensors,
        aliases=aliases,
        state_dict_keys=list(module.state_dict().keys()),
        placeholder_names=placeholders,
        written_buffers=written,
    )
