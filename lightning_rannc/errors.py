"""Exceptions raised by lightning_rannc.

Each subclasses a builtin so that callers catching ``ValueError``/``RuntimeError`` keep working,
while tests and users can catch the narrow type.
"""

from __future__ import annotations

__all__ = ["RaNNCError", "CaptureError", "PlanError", "RuntimeSetupError"]


class RaNNCError(Exception):
    """Base class of every error raised by lightning_rannc."""


class CaptureError(RaNNCError, ValueError):
    """The training step could not be captured as a graph (user code or batch problem)."""


class PlanError(RaNNCError, ValueError):
    """No valid partitioning exists for the given graph, devices and options."""


class RuntimeSetupError(RaNNCError, RuntimeError):
    """The pipeline runtime could not be built, or a step's input does not match the plan."""
