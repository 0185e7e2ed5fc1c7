"""Capture a LightningModule's ``training_step`` (or an evaluation step) as one exported graph.

``torch.export`` (non-strict) traces ``training_step(batch, batch_idx)`` as a function of the
batch's tensor leaves, at the micro-batch size. Lightning's ``self.log`` cannot run inside a
traced graph, so it is replaced during the trace by a recorder: the logged tensors become graph
outputs, and the strategy replays the ``log`` calls with the pipelined values after each step.

``validation_step``, ``test_step`` and ``predict_step`` are captured the same way (in eval
mode, forward only): their graph outputs are the logged values, then the tensors of whatever
the step returned; the rest of the returned structure is kept to rebuild it.
"""

from __future__ import annotations

import contextlib
import functools
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
    "MetricCall",
    "CapturedStep",
    "capture_training_step",
    "capture_step",
    "flatten_batch",
    "BatchSpec",
    "fake_module_state",
    "module_tensors",
]

log = logging.getLogger("lightning_rannc")

CONSTANT_PREFIX = "_rannc_constant_"
"""Names of tensors the step uses that are not the module's parameters or buffers."""


@dataclass(kw_only=True)
class LoggedValue:
    """One ``self.log`` call made by the step, to be replayed after each step."""

    name: str
    """The metric name given to ``self.log``."""
    kwargs: dict[str, Any]
    """Every other argument of the call (``prog_bar``, ``on_epoch``, ...)."""
    output_index: int | None
    """Position of the value among the graph's outputs; ``None`` for a Python constant."""
    constant: float | int | None = None
    """The value, when the user logged a Python number instead of a tensor."""
    metric: str | None = None
    """Path of the torchmetrics Metric object logged (``self.log("acc", self.acc)``)."""
    metric_call: tuple[int, str | None] | None = None
    """The metric call (and MetricCollection key) whose returned batch value was logged."""
    order: int = 0
    """Position among the step's side effects (``self.log`` and metric calls), to replay in order."""


@dataclass(kw_only=True)
class MetricCall:
    """A torchmetrics ``Metric`` or ``MetricCollection`` the step called (``self.acc(preds, y)``
    or ``.update(...)``): its tensor arguments are graph outputs, and the call is replayed after
    the step with the whole batch's arguments, so the metric's state is what one device has."""

    path: str
    """The metric's submodule path in the LightningModule."""
    method: str
    """``"forward"`` or ``"update"``."""
    arguments_spec: TreeSpec
    """Structure of ``(args, kwargs)``."""
    constants: list[Any]
    """The arguments' leaves; ``None`` where a tensor (a graph output) goes."""
    tensor_positions: list[int]
    first_output: int = 0
    """Graph output index of the call's first tensor argument."""
    order: int = 0


@dataclass(kw_only=True)
class CapturedStep:
    """The exported training step and what is needed to run it and replay its side effects."""

    program: ExportedProgram | None
    """The exported program; dropped once the stage is built (it references every tensor)."""
    batch_spec: BatchSpec
    """Structure of the batch; the graph's user inputs are its tensor leaves in order."""
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
    step_name: str = "training_step"
    output_spec: TreeSpec | None = None
    """Evaluation steps: structure of the returned value (``None`` for training steps)."""
    output_constants: list[Any] = field(default_factory=list)
    """Evaluation steps: the returned value's leaves; the tensors among them are graph outputs."""
    output_tensor_positions: list[int] = field(default_factory=list)
    """Evaluation steps: where in ``output_constants`` the graph's returned tensors go, in order."""
    output_batch_leaves: dict[int, int] = field(default_factory=dict)
    """Evaluation steps: returned leaves that are non-tensor leaves of the batch (a file name
    returned with the prediction): output position -> position among the batch's leaves."""
    placeholder_names: dict[str, str] = field(default_factory=dict)
    """Graph placeholder name -> canonical tensor name, for parameters, buffers and constants."""
    written_buffers: list[str] = field(default_factory=list)
    """Buffers the step updates in place (BatchNorm running statistics), by canonical name."""
    metric_calls: list[MetricCall] = field(default_factory=list)
    changed_attributes: list[str] = field(default_factory=list)
    """Public attributes of the module the step assigned or whose list/dict/set it changed:
    Python side effects, which happen only at capture."""
    first_metric_output: int = 0
    """Graph outputs from here on are metric arguments (per-sample tensors or scalars)."""

    def forget_tensors_except(self, keep: set[str]) -> None:
        """Drop the program and every tensor not in ``keep``, so that other stages' memory can be freed."""
        self.program = None
        self.tensors = {name: t for name, t in self.tensors.items() if name in keep}


@dataclass(frozen=True)
class BatchSpec:
    """How a batch is rebuilt from its tensor leaves: the pytree structure and the batch's other
    leaves (strings, ids, lists of numbers), which are not graph inputs."""

    tree: TreeSpec
    constants: tuple[Any, ...]
    """Every leaf in order; ``None`` where a tensor goes."""
    tensor_positions: tuple[int, ...]

    def unflatten(self, tensors: list[torch.Tensor], others: list[Any] | None = None) -> Any:
        """The batch with ``tensors`` in the tensor leaves' places, and ``others`` (default: the
        original values) in the other leaves' places."""
        leaves = list(self.constants)
        if others is not None:
            other_positions = [i for i in range(len(leaves)) if i not in self.tensor_positions]
            for position, value in zip(other_positions, others, strict=True):
                leaves[position] = value
        for position, tensor in zip(self.tensor_positions, tensors, strict=True):
            leaves[position] = tensor
        return tree_unflatten(leaves, self.tree)

    def opaque_others(self, where: str, step_name: str) -> list[Any]:
        """Stand-ins for the non-tensor leaves while the step is traced (see ``_OpaqueLeaf``);
        ``None`` stays ``None`` (``if mask is not None`` must see it)."""
        return [
            value if value is None else _OpaqueLeaf(value, f"`{step_name}` ({where})", index)
            for index, value in enumerate(self.constants)
            if index not in self.tensor_positions
        ]


def flatten_batch(batch: Any, where: str, step_name: str = "training_step") -> tuple[list[torch.Tensor], BatchSpec]:
    """The batch's tensor leaves (the graph's inputs), and how to rebuild the batch from them.
    Other leaves (file names, ids) pass through as long as the step does not use them."""
    leaves, tree = tree_flatten(batch)
    positions = tuple(i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor))
    if not positions:
        raise CaptureError(f"The batch passed to `{step_name}` ({where}) holds no tensors.")
    constants = tuple(None if i in positions else leaf for i, leaf in enumerate(leaves))
    return [leaves[i] for i in positions], BatchSpec(tree, constants, positions)


class _OpaqueLeaf:
    """Stands in for a non-tensor leaf of the batch while the step is traced. The captured
    graph takes tensors only, so a step may carry such a leaf along but not compute with it:
    any use raises an error naming it (a value baked into the graph would be stale later)."""

    def __init__(self, value: Any, where: str, position: int) -> None:
        object.__setattr__(self, "_value", value)
        object.__setattr__(self, "_where", where)
        object.__setattr__(self, "batch_position", position)

    def __repr__(self) -> str:
        return f"<batch leaf {object.__getattribute__(self, '_value')!r:.40}>"

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        value, where = object.__getattribute__(self, "_value"), object.__getattribute__(self, "_where")
        raise _LeafUsedError(
            f"{where} uses a {type(value).__name__} leaf of its batch ({value!r:.60}). RaNNCStrategy runs the step "
            "as a graph of tensors, captured once: convert it to a tensor in your DataLoader's collate_fn, "
            "or leave it unused in the step."
        )

    def __getattr__(self, name: str) -> Any:
        return self._refuse()


class _LeafUsedError(CaptureError, AttributeError):
    """Also an AttributeError: ``hasattr(leaf, "to")`` (device-moving helpers) answers False."""


for _dunder in ("__len__", "__iter__", "__getitem__", "__contains__", "__bool__", "__eq__", "__ne__", "__lt__",
                "__le__", "__gt__", "__ge__", "__hash__", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__",
                "__rmul__", "__truediv__", "__rtruediv__", "__floordiv__", "__mod__", "__neg__", "__int__",
                "__float__", "__index__", "__str__", "__format__", "__call__"):  # fmt: skip
    setattr(_OpaqueLeaf, _dunder, _OpaqueLeaf._refuse)


class _LogRecorder:
    """Stands in for ``LightningModule.log`` and the module's torchmetrics objects while the step
    is traced."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.calls: list[tuple[str, Any, dict[str, Any], int]] = []
        self.metric_calls: list[MetricCall] = []
        self.metric_tensors: list[torch.Tensor] = []
        # What the step returned. Kept here, not on the traced module: export restores the
        # module's attributes after tracing.
        self.output_info: dict[str, Any] = {}
        self.counter_reads: set[str] = set()
        self.metric_paths: dict[int, str] = {}
        self._placeholders: dict[int, tuple[int, str | None]] = {}
        self._kept: list[torch.Tensor] = []  # the placeholders, alive: their ids must stay theirs
        self._order = 0

    def clear(self) -> None:
        self.calls.clear()
        self.metric_calls.clear()
        self.metric_tensors.clear()
        self._placeholders.clear()
        self._kept.clear()
        self._order = 0

    def _next_order(self) -> int:
        self._order += 1
        return self._order

    def __call__(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if args:
            raise CaptureError(
                f"`self.log({name!r}, ...)` in {self.where} passes options positionally; "
                "pass them by keyword (e.g. `prog_bar=True`) so they can be replayed."
            )
        if id(value) in self.metric_paths:
            value = ("metric", self.metric_paths[id(value)])
        elif id(value) in self._placeholders:
            value = ("metric_call", self._placeholders[id(value)])
        elif isinstance(value, torch.Tensor):
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
                "RaNNCStrategy replays tensors, numbers and torchmetrics objects of the module only."
            )
        self.calls.append((name, value, kwargs, self._next_order()))

    def metric_call(self, path: str, method: str, metric: Any, *args: Any, **kwargs: Any) -> Any:
        """A metric's ``forward`` or ``update``: its arguments are kept (the tensors become graph
        outputs); ``forward``'s batch value exists only once the call is replayed, so the step
        gets a NaN placeholder that ``self.log`` recognises (arithmetic on it shows as NaN)."""
        leaves, spec = tree_flatten((args, kwargs))
        positions = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        constants = [None if i in positions else v for i, v in enumerate(leaves)]
        index = len(self.metric_calls)
        self.metric_calls.append(
            MetricCall(
                path=path,
                method=method,
                arguments_spec=spec,
                constants=constants,
                tensor_positions=positions,
                order=self._next_order(),
            )
        )
        self.metric_tensors += [leaves[i].detach() for i in positions]
        if method == "update":
            return None
        from torchmetrics import MetricCollection

        if isinstance(metric, MetricCollection):  # it returns one value per metric
            return {key: self._placeholder(index, key) for key in metric.keys(keep_base=False)}
        return self._placeholder(index, None)

    def _placeholder(self, index: int, key: Any) -> torch.Tensor:
        value = torch.full((), float("nan"))
        self._placeholders[id(value)] = (index, key)
        self._kept.append(value)
        return value


def _metric_modules(module: nn.Module) -> dict[str, nn.Module]:
    """The module's torchmetrics ``Metric`` and ``MetricCollection`` objects, by path."""
    from torchmetrics import Metric, MetricCollection

    return {path: m for path, m in module.named_modules() if isinstance(m, (Metric, MetricCollection))}


@contextlib.contextmanager
def _recording_metrics(module: nn.Module, recorder: _LogRecorder) -> Iterator[None]:
    # torchmetrics keeps a wrapped `update` (and nn.Module calls `self.forward`) as instance
    # attributes: shadow both, then put back exactly what was there.
    metrics = _metric_modules(module)
    recorder.metric_paths = {id(m): path for path, m in metrics.items()}
    saved: list[tuple[nn.Module, str, Any]] = []
    for path, metric in metrics.items():
        for method in ("forward", "update"):
            saved.append((metric, method, metric.__dict__.get(method, _MISSING)))
            call = functools.partial(recorder.metric_call, path, method, metric)
            object.__setattr__(metric, method, call)
    try:
        yield
    finally:
        for metric, method, original in saved:
            if original is _MISSING:
                del metric.__dict__[method]
            else:
                object.__setattr__(metric, method, original)


_MISSING = object()


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


def _python_state(module: nn.Module) -> dict[str, Any]:
    """What a step's Python side effects would change: each public attribute of the module, as
    ``_fingerprint``. Private ones are Lightning's and torch's."""
    return {
        name: _fingerprint(value) for name, value in vars(module).items() if not name.startswith("_") and name != "log"
    }


def _fingerprint(value: Any, depth: int = 2) -> Any:
    """The object, and for containers their length and (two levels down) their items' objects:
    changes when an attribute is assigned, appended to, or one of its entries replaced
    (``self.outputs[dataloader_idx].append(...)``, ``self.stats["n"] = ...``)."""
    if isinstance(value, dict):
        items: Any = [*value.keys(), *value.values()]
    elif isinstance(value, (list, tuple, set)):
        items = value
    else:
        return id(value)
    inner = tuple(_fingerprint(item, depth - 1) for item in items) if depth > 0 else ()
    return id(value), len(value), inner


class _StepFunction(nn.Module):
    """The function that is exported: batch leaves in, graph outputs out.

    Training: (loss, logged values, extra returned scalars). Evaluation steps: (logged values,
    tensors of the returned value)."""

    def __init__(
        self, module: nn.Module, spec: BatchSpec, where: str, step_name: str, extra_args: tuple[Any, ...]
    ) -> None:
        super().__init__()
        self.module = module
        self.spec = spec
        self.where = where
        self.step_name = step_name
        self.extra_args = extra_args
        self.recorder = _LogRecorder(where)

    def forward(self, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = self.spec.unflatten(list(leaves), self.spec.opaque_others(self.where, self.step_name))
        recorder = self.recorder
        recorder.clear()
        step = getattr(self.module, self.step_name)
        with (
            _recording_logs(self.module, recorder),
            _recording_metrics(self.module, recorder),
            _watching_counters(self.module, recorder.counter_reads),
        ):
            before = _python_state(self.module)
            output = step(batch, _WatchedIndex(0, recorder.counter_reads), *self.extra_args)
            after = _python_state(self.module)
        recorder.output_info["changed_attributes"] = sorted(n for n in after if before.get(n) != after[n])
        logged = [v for _, v, _, _ in recorder.calls if isinstance(v, torch.Tensor)]
        if self.step_name != "training_step":
            returned, output_spec = tree_flatten(output)
            positions = [i for i, v in enumerate(returned) if isinstance(v, torch.Tensor)]
            from_batch = {i: v.batch_position for i, v in enumerate(returned) if isinstance(v, _OpaqueLeaf)}
            constants = [None if i in positions or i in from_batch else v for i, v in enumerate(returned)]
            recorder.output_info.update(
                output_spec=output_spec,
                output_constants=constants,
                output_tensor_positions=positions,
                output_batch_leaves=from_batch,
            )
            outputs = [*(v.reshape(()) for v in logged), *(v.detach() for v in returned if isinstance(v, torch.Tensor))]
        else:
            loss, extras = _split_step_output(output, self.where)
            recorder.output_info.update(returns_dict=isinstance(output, Mapping), extra_keys=list(extras))
            outputs = [loss, *logged, *extras.values()]
        recorder.output_info["first_metric_output"] = first = len(outputs)
        for call in recorder.metric_calls:
            call.first_output, first = first, first + len(call.tensor_positions)
        return (*outputs, *recorder.metric_tensors)


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


def _logged_values(calls: list[tuple[str, Any, dict[str, Any], int]], first_index: int) -> list[LoggedValue]:
    logged, index = [], first_index
    for name, value, kwargs, order in calls:
        item = LoggedValue(name=name, kwargs=kwargs, output_index=None, order=order)
        if isinstance(value, torch.Tensor):
            item.output_index, index = index, index + 1
        elif isinstance(value, tuple) and value[0] == "metric":
            item.metric = value[1]
        elif isinstance(value, tuple):
            item.metric_call = value[1]
        else:
            item.constant = value
        logged.append(item)
    return logged


def _tensor_names(wrapper: _StepFunction, program: ExportedProgram) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
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
            name = f"{CONSTANT_PREFIX}{len(tensors)}"
        elif spec.kind == InputKind.USER_INPUT:
            continue
        else:
            raise CaptureError(
                f"`{wrapper.step_name}` ({wrapper.where}) uses a {spec.kind.name} input, which is not supported."
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
    """Buffers the step updates in place (BatchNorm running statistics); parameters may not be.
    ``where`` names the step and its location."""
    from torch.export.graph_signature import OutputKind

    for spec in program.graph_signature.output_specs:
        if spec.kind != OutputKind.USER_OUTPUT:
            raise CaptureError(f"{where} produces a {spec.kind.name} output, which is not supported.")
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
                    f"{where} changes the parameter `{placeholders[value.name]}` in place; "
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
        f"{where} reads {', '.join(names)}. RaNNCStrategy captures the step once, so "
        "every step uses the value seen at capture (batch_idx=0, the first step's epoch and step): "
        "anything computed from it is fixed. Move such logic to a hook (e.g. `on_train_batch_start`) "
        "or put the value in the batch."
    )


def _warn_side_effects(names: list[str], where: str) -> None:
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(
        f"{where} changes {', '.join(f'self.{n}' for n in names)}. RaNNCStrategy runs the step as a graph "
        "captured once, so Python side effects in it happen at capture only, not at every step. Move them "
        "to a hook (e.g. `on_train_batch_end`, which gets the step's outputs)."
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
    return capture_step(module, microbatch)


def capture_step(
    module: nn.Module, microbatch: Any, step_name: str = "training_step", extra_args: tuple[Any, ...] = ()
) -> CapturedStep:
    """Export ``module.<step_name>(microbatch, 0, *extra_args)`` (see ``capture_training_step``).
    ``extra_args`` is the ``dataloader_idx`` of evaluation steps with several loaders."""
    where = where_defined(getattr(type(module), step_name))
    leaves, spec = flatten_batch(microbatch, where, step_name)
    wrapper = _StepFunction(module, spec, where, step_name, extra_args)
    try:
        program = torch.export.export(wrapper, tuple(leaves), strict=False)
    except CaptureError:
        raise
    except Exception as err:  # export's own errors are long; keep them reachable at debug level
        log.debug("torch.export failed", exc_info=True)
        raise CaptureError(
            f"Could not capture `{type(module).__name__}.{step_name}` ({where}) as a graph: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. RaNNCStrategy "
            "needs a step without data-dependent Python control flow or `.item()`/`.tolist()` calls; "
            "set the `lightning_rannc` logger to DEBUG for the full torch.export report."
        ) from err
    info = wrapper.recorder.output_info
    is_training = step_name == "training_step"
    placeholders, tensors = _tensor_names(wrapper, program)
    named_where = f"`{step_name}` ({where})"
    written = _written_buffers(program, placeholders, named_where)
    if wrapper.recorder.counter_reads:
        _warn_fixed_counters(sorted(wrapper.recorder.counter_reads), named_where)
    if is_training and info["changed_attributes"]:
        _warn_side_effects(info["changed_attributes"], named_where)
    _, aliases, _ = _canonical_names(module)
    return CapturedStep(
        program=program,
        batch_spec=spec,
        microbatch_size=int(leaves[0].shape[0]) if leaves[0].dim() else 1,
        logged=_logged_values(wrapper.recorder.calls, first_index=1 if is_training else 0),
        extra_keys=info.get("extra_keys", []),
        returns_dict=info.get("returns_dict", False),
        tensors=tensors,
        aliases=aliases,
        state_dict_keys=list(module.state_dict().keys()),
        step_name=step_name,
        output_spec=info.get("output_spec"),
        output_constants=info.get("output_constants", []),
        output_tensor_positions=info.get("output_tensor_positions", []),
        output_batch_leaves=info.get("output_batch_leaves", {}),
        metric_calls=list(wrapper.recorder.metric_calls),
        changed_attributes=info["changed_attributes"],
        first_metric_output=info["first_metric_output"],
        placeholder_names=placeholders,
        written_buffers=written,
    )
