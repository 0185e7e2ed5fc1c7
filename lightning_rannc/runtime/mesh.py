"""Process groups of a plan: the pipeline (``pp``) and replica (``dp``) axes of a DeviceMesh,
and the groups that sum gradients of parameters held by several stages of one pipeline.

Every rank must build these in the same order: creating a group is collective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lightning_rannc.plan.plan import PartitionPlan

__all__ = ["MeshAxis", "ProcessGroups", "build_process_groups", "add_tied_groups", "destroy_process_group_at_exit"]


class MeshAxis(str, Enum):
    PP = "pp"
    DP = "dp"


@dataclass(kw_only=True)
class ProcessGroups:
    """This rank's view of the mesh."""

    mesh: DeviceMesh | None
    pp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    pp_rank: int
    dp_rank: int
    pipeline_stages: int
    num_replicas: int
    tied: list[tuple[dist.ProcessGroup, list[str]]] = field(default_factory=list)
    """Groups of this rank's pipeline that share parameters, with the shared parameter names."""

    def destroy(self) -> None:
        """Destroy the groups made for this mesh. Left to interpreter exit, gloo's threads can end
        the process with "terminate called without an active exception"."""
        if not dist.is_initialized():
            return
        groups = [g for g, _ in self.tied] + [self.pp_group, self.dp_group]
        for group in {id(g): g for g in groups if g is not None and g is not dist.GroupMember.WORLD}.values():
            dist.destroy_process_group(group)
        self.tied, self.pp_group, self.dp_group, self.mesh = [], None, None, None

    def replica_rank(self, dp_rank: int) -> int:
        """Global rank of replica ``dp_rank`` at this rank's pipeline position."""
        return dp_rank * self.pipeline_stages + self.pp_rank


def build_process_groups(pipeline_stages: int, num_replicas: int, rank: int, device: torch.device) -> ProcessGroups:
    """The ``dp`` x ``pp`` mesh of ``num_replicas`` pipelines of ``pipeline_stages`` ranks.
    Collective: call on every rank."""
    mesh = pp_group = dp_group = None
    if dist.is_initialized():
        names = (MeshAxis.DP.value, MeshAxis.PP.value)
        mesh = init_device_mesh(device.type, (num_replicas, pipeline_stages), mesh_dim_names=names)
        pp_group, dp_group = mesh.get_group(MeshAxis.PP.value), mesh.get_group(MeshAxis.DP.value)
    return ProcessGroups(
        mesh=mesh,
        pp_group=pp_group,
        dp_group=dp_group,
        pp_rank=rank % pipeline_stages,
        dp_rank=rank // pipeline_stages,
        pipeline_stages=pipeline_stages,
        num_replicas=num_replicas,
    )


def add_tied_groups(groups: ProcessGroups, plan: PartitionPlan, rank: int, trainable: set[str]) -> None:
    """Create the groups that sum gradients of parameters several stages hold. Collective."""
    if dist.is_initialized():
        groups.tied = _tied_groups(plan, rank, trainable)


def _tied_groups(plan: PartitionPlan, rank: int, trainable: set[str]) -> list[tuple[dist.ProcessGroup, list[str]]]:
    """For each replica, a group per set of pipeline positions that hold the same parameters."""
    positions: dict[str, set[int]] = {}
    for stage in plan.stages:
        for name in stage.tensor_names:
            if name in trainable:
                positions.setdefault(name, set()).add(stage.stage_index % plan.pipeline_stages)
    by_positions: dict[tuple[int, ...], list[str]] = {}
    for name, positions_of_name in positions.items():
        if len(positions_of_name) > 1:
            by_positions.setdefault(tuple(sorted(positions_of_name)), []).append(name)
    tied = []
    for replica in range(plan.num_replicas):
        for held_at, names in sorted(by_positions.items()):
            ranks = [replica * plan.pipeline_stages + p for p in held_at]
            group = dist.new_group(ranks)  # every rank creates every group, in the same order
            if rank in ranks and group is not None:
                tied.append((group, names))
    return tied


def destroy_process_group_at_exit() -> None:
    """``atexit`` hook. A process group left for interpreter shutdown sometimes aborts the process
    ("terminate called without an active exception", exit code 134) with gloo on torch 2.13,
    after training finished: plain DDP runs show it too. Destroying it while Python still runs
    lets its threads finish."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
