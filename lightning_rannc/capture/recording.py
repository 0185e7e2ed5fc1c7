"""Side effects of a step recorded while it is traced, to be replayed after each pipelined step.

Lightning's ``self.log`` and torchmetrics calls cannot run inside a traced graph. While the step
is traced, ``self.log`` is a ``LogRecorder`` and each torchmetrics object's ``forward``/``update``
records its call: logged tensors and metric arguments become graph outputs, and the strategy
replays the calls, in their order, with the pipelined values.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_rannc._compat import TreeSpec, tree_flatten
from lightning_rannc.capture.guards import Expression, WatchedFloat, WatchedInt, expression_of, plain
from lightning_rannc.errors import CaptureError

__all__ = ["LoggedValue", "MetricCall", "LogRecorder", "recording_logs", "recording_metrics", "logged_values"]


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
    expression: Expression | None = None
    """How that number was computed from state that changes between steps (the learning rate,
    ``self.global_step``): re-evaluated at every step (``guards.py``)."""
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


class LogRecorder:
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
        # A changing number passed to a metric is fixed in the recorded call: a guard (the step
        # is captured again when it changes).
        constants = [None if i in positions else _fixed(v) for i, v in enumerate(leaves)]
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


def _fixed(value: Any) -> Any:
    if isinstance(value, WatchedInt):
        return int(value)
    return float(value) if isinstance(value, WatchedFloat) else value


def _metric_modules(module: nn.Module) -> dict[str, nn.Module]:
    """The module's torchmetrics ``Metric`` and ``MetricCollection`` objects, by path."""
    from torchmetrics import Metric, MetricCollection

    return {path: m for path, m in module.named_modules() if isinstance(m, (Metric, MetricCollection))}


@contextlib.contextmanager
def recording_metrics(module: nn.Module, recorder: LogRecorder) -> Iterator[None]:
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
def recording_logs(module: nn.Module, recorder: LogRecorder) -> Iterator[None]:
    # An instance attribute shadows the method; `log_dict` calls `self.log`, so it is covered too.
    module.log = recorder  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        del module.log


def logged_values(calls: list[tuple[str, Any, dict[str, Any], int]], first_index: int) -> list[LoggedValue]:
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
            item.constant = plain(value)
            if isinstance(value, (WatchedInt, WatchedFloat)):
                item.expression = expression_of(value)
        logged.append(item)
    return logged
