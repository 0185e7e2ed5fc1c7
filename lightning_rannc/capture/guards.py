"""Python numbers a step reads from state that changes between steps, and what it did with them.

A step is captured once per batch shape, but it may read ``batch_idx``, ``self.global_step``,
``self.current_epoch``, an optimizer's learning rate or a number kept on the module. While the
step is traced, each of these is a ``WatchedInt``/``WatchedFloat``: arithmetic on it gives another
watched number that remembers how it was computed (an expression over the sources), and each use
that fixes something in the graph is a ``Guard``:

- a branch or conversion (``if batch_idx % 2 == 0``, ``range(n)``, an f-string) records the
  expression and the result it had;
- a use inside a tensor operation (``loss * lr``, ``torch.full(..., n)``) records the value, which
  the graph now holds as a constant.

At each step the runtime re-reads the sources (``source_values``) and checks the guards of the
graphs captured for the batch's shape: a graph whose guards hold is the step's graph; otherwise
the step is captured again for the new values (one graph per branch taken). A value baked into a
tensor operation that changes cannot be repeated by any graph, and is refused with the line named.
Logged numbers keep their expression and are re-evaluated at every step (``evaluate``).
"""

from __future__ import annotations

import inspect
import linecache
import math
import operator
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch.overrides import TorchFunctionMode

from lightning_rannc._compat import tree_flatten, tree_map

__all__ = [
    "Expression",
    "Guard",
    "GuardBook",
    "Source",
    "WatchedFloat",
    "WatchedInt",
    "describe",
    "evaluate",
    "expression_of",
    "plain",
    "sources_of",
    "watched",
]

Source = tuple[Any, ...]
"""Where a number is read: ``("batch_idx",)``, ``("trainer", "global_step")``,
``("optimizer", i, group, key)``, ``("scheduler", i, group)`` or ``("attribute", name)``."""

Expression = tuple[Any, ...]
"""``("source", Source)``, ``("const", value)`` or ``(op, *operands)`` with ops from ``_OPS``."""

_OPS: dict[str, Callable[..., Any]] = {
    **{name: getattr(operator, name) for name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow")},
    **{name: getattr(operator, name) for name in ("eq", "ne", "lt", "le", "gt", "ge", "neg", "pos", "abs")},
    "divmod": divmod,
    "bool": bool,
    "int": int,
    "float": float,
    "index": operator.index,
    "format": format,
    "str": str,
    "repr": repr,
    "hash": hash,
    "round": round,
    "trunc": math.trunc,
    "floor": math.floor,
    "ceil": math.ceil,
}


@dataclass(frozen=True)
class Guard:
    """One use of watched numbers that the captured graph depends on."""

    expression: Expression
    result: Any
    """What the expression gave at capture."""
    where: str
    """The user's line (``file:line: code``)."""
    in_tensor: bool = False
    """The value went into a tensor operation: the graph holds it as a constant."""

    def holds(self, values: dict[Source, Any]) -> bool:
        try:
            return bool(evaluate(self.expression, values) == self.result)
        except (KeyError, ArithmeticError, TypeError, ValueError):
            return False


class GuardBook:
    """The guards recorded while one step is traced."""

    def __init__(self) -> None:
        self.guards: list[Guard] = []

    def clear(self) -> None:
        self.guards.clear()

    def note(self, expression: Expression, result: Any, in_tensor: bool = False) -> None:
        self.guards.append(Guard(expression, result, _user_line(), in_tensor))

    def mode(self) -> TorchFunctionMode:
        """Records watched numbers passed to torch functions, which hand them on as plain numbers."""
        return _TensorUse(self)


class _Watched:
    """A number read from changing state, as the traced step sees it."""

    _expression: Expression
    _book: GuardBook


def plain(value: Any) -> Any:
    """The number behind ``value``, without recording a use."""
    if isinstance(value, bool) or not isinstance(value, _Watched):
        return value
    return int.__int__(value) if isinstance(value, int) else float.__float__(value)  # type: ignore[arg-type]


def expression_of(value: Any) -> Expression:
    return value._expression if isinstance(value, _Watched) else ("const", value)


def _watched(value: Any, expression: Expression, book: GuardBook) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    result: Any = WatchedInt(value) if isinstance(value, int) else WatchedFloat(value)
    result._expression, result._book = expression, book
    return result


def watched(value: Any, source: Source, book: GuardBook) -> Any:
    """``value`` (an int or float, not a bool) as a watched number read from ``source``."""
    return _watched(value, ("source", source), book)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float))


def _arithmetic(name: str, reflected: bool) -> Callable[..., Any]:
    def method(self: _Watched, other: Any = None) -> Any:
        if other is not None and not _is_number(other):
            return NotImplemented  # a tensor's own reflected method runs, seen by the mode
        operands = [self] if other is None else ([other, self] if reflected else [self, other])
        result = _OPS[name](*map(plain, operands))
        return _watched(result, (name, *map(expression_of, operands)), self._book)

    return method


def _terminal(name: str) -> Callable[..., Any]:
    """A use that leaves the watched world (a bool, a plain number, a string): recorded."""

    def method(self: _Watched, *args: Any) -> Any:
        if args and name in ("eq", "ne", "lt", "le", "gt", "ge", "divmod") and not _is_number(args[0]):
            return NotImplemented
        operands = [self, *args]
        result = _OPS[name](*map(plain, operands))
        self._book.note((name, *map(expression_of, operands)), result)
        return result

    return method


class WatchedInt(_Watched, int):
    pass


class WatchedFloat(_Watched, float):
    pass


for _cls in (WatchedInt, WatchedFloat):
    for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow"):
        setattr(_cls, f"__{_name}__", _arithmetic(_name, reflected=False))
        setattr(_cls, f"__r{_name}__", _arithmetic(_name, reflected=True))
    for _name in ("neg", "pos", "abs"):
        setattr(_cls, f"__{_name}__", _arithmetic(_name, reflected=False))
    for _name in ("eq", "ne", "lt", "le", "gt", "ge", "divmod", "bool", "int", "float", "index", "format",
                  "str", "repr", "hash", "round", "trunc", "floor", "ceil"):  # fmt: skip
        setattr(_cls, f"__{_name}__", _terminal(_name))


def evaluate(expression: Expression, values: dict[Source, Any]) -> Any:
    """``expression`` with the sources' current ``values``."""
    kind = expression[0]
    if kind == "const":
        return expression[1]
    if kind == "source":
        return values[expression[1]]
    return _OPS[kind](*(evaluate(operand, values) for operand in expression[1:]))


def sources_of(expressions: Iterable[Expression]) -> set[Source]:
    found: set[Source] = set()
    for expression in expressions:
        if expression[0] == "source":
            found.add(expression[1])
        elif expression[0] != "const":
            found |= sources_of(expression[1:])
    return found


def describe(source: Source) -> str:
    """A source as the user wrote it."""
    if source[0] == "batch_idx":
        return "batch_idx"
    if source[0] == "trainer":
        return f"self.{source[1]}"
    if source[0] == "optimizer":
        return f"optimizer {source[1]}'s param_groups[{source[2]}][{source[3]!r}]"
    if source[0] == "scheduler":
        return f"scheduler {source[1]}'s get_last_lr()[{source[2]}]"
    return f"self.{source[1]}"


class _TensorUse(TorchFunctionMode):
    def __init__(self, book: GuardBook) -> None:
        super().__init__()
        self.book = book

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        leaves, _ = tree_flatten((args, kwargs))
        for leaf in leaves:
            if isinstance(leaf, _Watched):
                self.book.note(leaf._expression, plain(leaf), in_tensor=True)
        if any(isinstance(leaf, _Watched) for leaf in leaves):
            args, kwargs = tree_map(plain, (args, kwargs))
        return func(*args, **kwargs)


def _package_dir(name: str) -> str | None:
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    return os.path.dirname(os.path.abspath(path)) + os.sep if path else None


def _user_line() -> str:
    """``file:line: code`` of the innermost frame outside torch, Lightning, this package and the
    standard library: the user's line that used the number."""
    packages = ("torch", "lightning", "pytorch_lightning", "lightning_fabric", "lightning_rannc", "torchmetrics")
    skipped = tuple(d for d in (*map(_package_dir, packages), os.path.dirname(operator.__file__) + os.sep) if d)
    frame = inspect.currentframe()
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(skipped) and not filename.startswith("<"):
            code = linecache.getline(filename, frame.f_lineno).strip()
            return f"{filename}:{frame.f_lineno}: `{code}`"
        frame = frame.f_back  # type: ignore[assignment]
    return "an unknown line"
