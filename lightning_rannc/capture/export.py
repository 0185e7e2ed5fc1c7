"""Capture a LightningModule's ``training_step`` (or an evaluation step) as one exported graph.

``torch.export`` (non-strict) traces ``training_step(batch, batch_idx)`` as a function of the
batch's tensor leaves (``batch.py``), at the micro-batch size. Lightning's ``self.log`` cannot
run inside a traced graph, so it is replaced during the trace by a recorder (``recording.py``):
the logged tensors become graph outputs, and the strategy replays the ``log`` calls with the
pipelined values after each step. Reads of per-step counters and Python side effects are
watched (``watching.py``).

``validation_step``, ``test_step`` and ``predict_step`` are captured the same way (in eval
mode, forward only): their graph outputs are the logged values, then the tensors of whatever
the step returned; the rest of the returned structure is kept to rebuild it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from lightning_rannc._compat import TreeSpec, op_schema, tree_flatten
from lightning_rannc._utils import where_defined
from lightning_rannc.capture.batch import BatchSpec, FlatBatch, OpaqueLeaf
from lightning_rannc.capture.guards import Guard, GuardBook
from lightning_rannc.capture.module_state import canonical_names
from lightning_rannc.capture.recording import (
    LoggedValue,
    LogRecorder,
    MetricCall,
    logged_values,
    recording_logs,
    recording_metrics,
)
from lightning_rannc.capture.reductions import MEAN, SUM, Reduction, declared_reduction, output_reductions
from lightning_rannc.capture.watching import python_state, warn_side_effects, watching_numbers
from lightning_rannc.errors import CaptureError

__all__ = ["CONSTANT_PREFIX", "CapturedStep", "capture_training_step", "capture_step"]

log = logging.getLogger("lightning_rannc")

CONSTANT_PREFIX = "_rannc_constant_"
"""Names of tensors the step uses that are not the module's parameters or buffers."""


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
    tensor_extra_keys: list[str] = field(default_factory=list)
    """Keys of the returned dict whose values are per-sample tensors (first dimension = batch):
    graph outputs from ``first_tensor_output`` on, concatenated over micro-batches."""
    returned_keys: list[str] = field(default_factory=list)
    """Keys of the returned dict, in the user's order."""
    first_tensor_output: int = 0
    """Graph outputs from here on are combined by concatenation (per-sample tensors): the
    returned per-sample extras, then the metric arguments. Those before are averaged scalars."""
    first_metric_output: int = 0
    """Graph outputs from here on are metric arguments (per-sample tensors or scalars)."""
    output_reductions: dict[int, Reduction] = field(default_factory=dict)
    """Scalar graph output -> how it combines over micro-batches (``reductions.py``)."""
    guards: list[Guard] = field(default_factory=list)
    """Uses of numbers that change between steps the graph depends on (``guards.py``)."""

    def forget_tensors_except(self, keep: set[str]) -> None:
        """Drop the program and every tensor not in ``keep``, so that other stages' memory can be freed."""
        self.program = None
        self.tensors = {name: t for name, t in self.tensors.items() if name in keep}


def _split_step_output(
    output: Any, where: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The loss, the other scalars and the other (per-sample) tensors ``training_step`` returned,
    detached as Lightning hands them to ``on_train_batch_end``."""
    extras: dict[str, torch.Tensor] = {}
    per_sample: dict[str, torch.Tensor] = {}
    if isinstance(output, Mapping):
        if "loss" not in output:
            raise CaptureError(
                f"`training_step` ({where}) returned a dict without a 'loss' key "
                f"(keys: {sorted(output)}). Return the loss tensor, or a dict with 'loss'."
            )
        extras = {k: v.detach() for k, v in output.items() if k != "loss" and _is_scalar(v)}
        per_sample = {
            k: v.detach() for k, v in output.items() if isinstance(v, torch.Tensor) and k != "loss" and k not in extras
        }
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
    return output.reshape(()), extras, per_sample


def _is_scalar(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.numel() == 1


class _StepFunction(nn.Module):
    """The function that is exported: batch leaves in, graph outputs out.

    Training: (loss, logged values, extra returned scalars). Evaluation steps: (logged values,
    tensors of the returned value)."""

    def __init__(
        self,
        module: nn.Module,
        spec: BatchSpec,
        where: str,
        step_name: str,
        extra_args: tuple[Any, ...],
        batch_idx: int,
    ) -> None:
        super().__init__()
        self.module = module
        self.spec = spec
        self.where = where
        self.step_name = step_name
        self.extra_args = extra_args
        self.batch_idx = batch_idx
        self.recorder = LogRecorder(where)
        self.book = GuardBook()

    def forward(self, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = self.spec.unflatten(list(leaves), self.spec.opaque_others(self.where, self.step_name))
        recorder = self.recorder
        recorder.clear()
        self.book.clear()
        step = getattr(self.module, self.step_name)
        with (
            recording_logs(self.module, recorder),
            recording_metrics(self.module, recorder),
            watching_numbers(self.module, self.batch_idx, self.book) as batch_idx,
        ):
            before = python_state(self.module)
            output = step(batch, batch_idx, *self.extra_args)
            after = python_state(self.module)
        recorder.output_info["changed_attributes"] = sorted(n for n in after if before.get(n) != after[n])
        logged = [v for _, v, _, _ in recorder.calls if isinstance(v, torch.Tensor)]
        if self.step_name != "training_step":
            returned, output_spec = tree_flatten(output)
            positions = [i for i, v in enumerate(returned) if isinstance(v, torch.Tensor)]
            from_batch = {i: v.batch_position for i, v in enumerate(returned) if isinstance(v, OpaqueLeaf)}
            constants = [None if i in positions or i in from_batch else v for i, v in enumerate(returned)]
            recorder.output_info.update(
                output_spec=output_spec,
                output_constants=constants,
                output_tensor_positions=positions,
                output_batch_leaves=from_batch,
            )
            outputs = [*(v.reshape(()) for v in logged), *(v.detach() for v in returned if isinstance(v, torch.Tensor))]
        else:
            loss, extras, per_sample = _split_step_output(output, self.where)
            returned = [k for k in output if k in extras or k in per_sample] if isinstance(output, Mapping) else []
            recorder.output_info.update(
                returns_dict=isinstance(output, Mapping), extra_keys=list(extras), returned_keys=["loss", *returned]
            )
            outputs = [loss, *logged, *extras.values()]
            recorder.output_info.update(first_tensor_output=len(outputs), tensor_extra_keys=list(per_sample))
            outputs += per_sample.values()
        recorder.output_info["first_metric_output"] = first = len(outputs)
        recorder.output_info.setdefault("first_tensor_output", first)
        for call in recorder.metric_calls:
            call.first_output, first = first, first + len(call.tensor_positions)
        return (*outputs, *recorder.metric_tensors)


def _tensor_names(wrapper: _StepFunction, program: ExportedProgram) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Map each lifted placeholder to a canonical name and the real tensor behind it."""
    from torch.export.graph_signature import InputKind

    # Every parameter/buffer, used by the graph or not: unused ones still belong in checkpoints.
    by_id, _, tensors = canonical_names(wrapper.module)
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
        schema = op_schema(node.target)
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


def capture_training_step(module: nn.Module, microbatch: Any, batch_idx: int = 0) -> CapturedStep:
    """Export ``module.training_step`` for one micro-batch.

    Args:
        module: the user's LightningModule, on its training device, in train mode.
        microbatch: a batch of the micro-batch size, structured as the DataLoader yields it.

    Returns:
        The captured step; its graph's user inputs are the micro-batch's tensor leaves in order.

    Raises:
        CaptureError: the step or the batch cannot be captured; the message names the user's code.
    """
    return capture_step(module, microbatch, batch_idx=batch_idx)


def capture_step(
    module: nn.Module,
    microbatch: Any,
    step_name: str = "training_step",
    extra_args: tuple[Any, ...] = (),
    batch_idx: int = 0,
) -> CapturedStep:
    """Export ``module.<step_name>(microbatch, batch_idx, *extra_args)`` (see
    ``capture_training_step``). ``microbatch`` is structured as the DataLoader yields it, or
    already a ``FlatBatch`` (the strategy's, sliced: it is not flattened again). ``extra_args`` is
    the ``dataloader_idx`` of evaluation steps with several loaders."""
    where = where_defined(getattr(type(module), step_name))
    flat = microbatch if isinstance(microbatch, FlatBatch) else FlatBatch.of(microbatch, where, step_name)
    leaves, spec = flat.leaves, flat.spec
    wrapper = _StepFunction(module, spec, where, step_name, extra_args, batch_idx)
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
    if is_training and info["changed_attributes"]:
        warn_side_effects(info["changed_attributes"], named_where)
    _, aliases, _ = canonical_names(module)
    logged = logged_values(wrapper.recorder.calls, first_index=1 if is_training else 0)
    reductions = _reductions(program, logged, int(leaves[0].shape[0]) if leaves[0].dim() else 1)
    if is_training and reductions.get(0, MEAN) not in (MEAN, SUM):
        raise CaptureError(
            f"The loss of {named_where} is a {reductions[0]} over samples. RaNNCStrategy sums the gradients "
            "of micro-batches, which gives one device's gradient for a mean or a sum over samples only: "
            "return a mean (or sum) loss, and log the maximum or minimum with `self.log` instead."
        )
    return CapturedStep(
        program=program,
        batch_spec=spec,
        microbatch_size=int(leaves[0].shape[0]) if leaves[0].dim() else 1,
        logged=logged,
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
        first_tensor_output=info["first_tensor_output"],
        tensor_extra_keys=info.get("tensor_extra_keys", []),
        returned_keys=info.get("returned_keys", []),
        placeholder_names=placeholders,
        written_buffers=written,
        output_reductions=reductions,
        guards=list(wrapper.book.guards),
    )


def _reductions(program: ExportedProgram, logged: list[LoggedValue], microbatch_size: int) -> dict[int, Reduction]:
    """How each scalar output combines over micro-batches: as the graph computes it, else as the
    ``self.log`` call's ``reduce_fx`` says."""
    declared = {
        item.output_index: declared_reduction(item.kwargs.get("reduce_fx", "mean"))
        for item in logged
        if item.output_index is not None
    }
    user_inputs = set(program.graph_signature.user_inputs)
    return output_reductions(program.graph, user_inputs, microbatch_size, declared)
