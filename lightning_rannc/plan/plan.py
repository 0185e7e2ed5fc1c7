"""The partition plan: the contract between the planner and the runtime.

A plan is plain data. It can be written to JSON, read back, diffed and edited by hand; the
runtime builds exactly what it says and never re-decides.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning_rannc.errors import PlanError

__all__ = ["StagePlan", "PartitionPlan", "Plan"]

_FORMAT_VERSION = 1
_SCHEDULES = ("gpipe",)


@dataclass(kw_only=True)
class StagePlan:
    """One pipeline stage: a node range of the captured graph and the ranks that run it."""

    stage_index: int
    ranks: list[int]
    """Global ranks running this stage (one per data-parallel replica)."""
    node_start: int
    """First node of the stage in the captured graph's topological order."""
    node_end: int
    """One past the stage's last node."""
    module_span: str
    """Human-readable module paths the stage covers, e.g. ``"emb, blocks.0-3"``."""
    tensor_names: list[str]
    """Canonical names of the parameters/buffers the stage holds."""
    num_params: int
    fwd_ms: float
    """Profiled forward time of one micro-batch."""
    bwd_ms: float
    """Profiled backward time of one micro-batch."""
    param_bytes: int
    activation_bytes: int
    """Bytes saved for backward per micro-batch."""
    send_bytes: int
    """Bytes sent to the next stage per micro-batch."""


@dataclass(kw_only=True)
class PartitionPlan:
    """Stages, micro-batches and schedule for one captured graph on one set of devices.

    Example::

        plan = PartitionPlan.from_json(Path("plan.json").read_text())
        print(plan.summary())
    """

    graph_fingerprint: str
    """Hash of the captured graph the plan was made for; a different graph rejects the plan."""
    world_size: int
    num_microbatches: int
    microbatch_size: int
    stages: list[StagePlan]
    schedule: str = "gpipe"
    predicted_step_ms: float = 0.0
    no_grad_values: list[str] = field(default_factory=list)
    """Values crossing a cut that carry no gradient to the loss; the runtime detaches them."""
    version: int = _FORMAT_VERSION

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def stage_of_rank(self, rank: int) -> StagePlan:
        for stage in self.stages:
            if rank in stage.ranks:
                return stage
        raise PlanError(f"Rank {rank} has no stage in this plan (ranks: {[s.ranks for s in self.stages]}).")

    def validate(self) -> None:
        """Check the plan's internal consistency; raise ``PlanError`` naming the broken rule."""
        if self.schedule not in _SCHEDULES:
            raise PlanError(f"Unknown schedule {self.schedule!r}; valid: {list(_SCHEDULES)}.")
        if self.num_microbatches < 1:
            raise PlanError(f"num_microbatches must be >= 1, got {self.num_microbatches}.")
        ranks = sorted(r for s in self.stages for r in s.ranks)
        if ranks != list(range(self.world_size)):
            raise PlanError(f"Stages must use each of the {self.world_size} ranks once; they use {ranks}.")
        for before, after in zip(self.stages, self.stages[1:]):
            if before.node_end != after.node_start or after.node_start >= after.node_end:
                raise PlanError(
                    f"Stages {before.stage_index} and {after.stage_index} are not contiguous, non-empty "
                    f"node ranges ({before.node_start}-{before.node_end}, {after.node_start}-{after.node_end})."
                )
        if [s.stage_index for s in self.stages] != list(range(len(self.stages))):
            raise PlanError("Stage indices must be 0, 1, ... in order.")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> PartitionPlan:
        try:
            data: dict[str, Any] = json.loads(text)
            if data.get("version") != _FORMAT_VERSION:
                raise PlanError(f"Plan format version {data.get('version')} is not {_FORMAT_VERSION}; re-plan.")
            stages = [StagePlan(**s) for s in data.pop("stages")]
            plan = cls(stages=stages, **data)
        except (json.JSONDecodeError, TypeError, KeyError) as err:
            raise PlanError(f"Not a valid lightning_rannc plan ({type(err).__name__}: {err}); re-plan.") from err
        plan.validate()
        return plan

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> PartitionPlan:
        return cls.from_json(Path(path).read_text())

    def summary(self) -> list[str]:
        """One line per stage, as logged at setup."""
        head = (
            f"plan: {self.num_stages} stage(s), {self.num_microbatches} micro-batch(es) of {self.microbatch_size}, "
            f"schedule={self.schedule}, predicted step {self.predicted_step_ms:.2f} ms"
        )
        lines = [head]
        for s in self.stages:
            lines.append(
                f"  stage {s.stage_index} ranks={s.ranks} modules=[{s.module_span}] params={s.num_params:,} "
                f"fwd={s.fwd_ms:.3f}ms bwd={s.bwd_ms:.3f}ms param_mem={_mib(s.param_bytes)} "
                f"act_mem/mb={_mib(s.activation_bytes)} send/mb={_mib(s.send_bytes)}"
            )
        return lines


Plan = PartitionPlan


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.2f}MiB"
