"""Exceptions raised by lightning_rannc.

Each subclasses a builtin so that callers catching ``ValueError``/``RuntimeError`` keep working,
while tests and users can catch the narrow type.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["RaNNCError", "CaptureError", "PlanError", "RuntimeSetupError"]


class RaNNCError(Exception):
    """Base class of every error raised by lightning_rannc."""


class CaptureError(RaNNCError, ValueError):
    """The training step could not be captured as a graph (user code or batch problem)."""


class PlanError(RaNNCError, ValueError):
    """No valid partitioning exists for the given graph, devices and options.

    Where the model does not fit, ``problem`` says so and ``remedies`` lists each change that
    would make it fit (a caller that can check more changes adds them with ``with_remedies``).
    """

    def __init__(self, message: str, *, problem: str = "", remedies: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problem = problem
        self.remedies = list(remedies)

    @classmethod
    def does_not_fit(cls, problem: str, remedies: Sequence[str]) -> PlanError:
        message = f"{problem}. What would fit: " + "; ".join([*remedies, "or a smaller batch"]) + "."
        return cls(message, problem=problem, remedies=remedies)

    def with_remedies(self, more: Sequence[str]) -> PlanError:
        return PlanError.does_not_fit(self.problem, [*self.remedies, *more]) if self.problem and more else self


class RuntimeSetupError(RaNNCError, RuntimeError):
    """The pipeline runtime could not be built, or a step's input does not match the plan."""
