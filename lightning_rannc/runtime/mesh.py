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

from lightning_rannc._compat import abort_process_group
from lightning_rannc.plan.plan import PartitionPlan

__all__ = [
    "MeshAxis",
    "ProcessGroups",
    "build_process_groups",
    "add_tied_groups",
    "barrier",
    "destroy_process_group_at_exit",
    "note_failure",
]

_failed = False
"""Whether this process saw a failure: its peers may be dead (``note_failure``)."""


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
    cpu_group: dist.ProcessGroup | None = None
    """Every rank over gloo, for host-side transfers (full checkpoints): NCCL would carry them
    through GPU buffers. ``None``: the default group, which is gloo already."""

    def destroy(self) -> None:
        """Destroy the groups made for this mesh (abort them after a failure, see ``_end``). Left
        to interpreter exit, gloo's threads can end the process with "terminate called without
        an active exception"."""
        if not dist.is_initialized():
            return
        for group in self._groups():
            _end(group)
        self.tied, self.pp_group, self.dp_group, self.mesh, self.cpu_group = [], None, None, None, None

    def _groups(self) -> list[dist.ProcessGroup]:
        """This rank's groups of the mesh, the world excluded, each once, in creation order."""
        groups = [self.pp_group, self.dp_group, self.cpu_group] + [g for g, _ in self.tied]
        return list({id(g): g for g in groups if g is not None and g is not dist.GroupMember.WORLD}.values())

    def replica_rank(self, dp_rank: int) -> int:
        """Global rank of replica ``dp_rank`` at this rank's pipeline position."""
        return dp_rank * self.pipeline_stages + self.pp_rank


def build_process_groups(pipeline_stages: int, num_replicas: int, rank: int, device: torch.device) -> ProcessGroups:
    """The ``dp`` x ``pp`` mesh of ``num_replicas`` pipelines of ``pipeline_stages`` ranks.
    Collective: call on every rank."""
    mesh = pp_group = dp_group = cpu_group = None
    if dist.is_initialized():
        names = (MeshAxis.DP.value, MeshAxis.PP.value)
        mesh = init_device_mesh(device.type, (num_replicas, pipeline_stages), mesh_dim_names=names)
        pp_group, dp_group = mesh.get_group(MeshAxis.PP.value), mesh.get_group(MeshAxis.DP.value)
        _warm_up([pp_group, dp_group], device)
        if dist.get_backend() != "gloo":
            cpu_group = dist.new_group(backend="gloo")
    return ProcessGroups(
        mesh=mesh,
        pp_group=pp_group,
        dp_group=dp_group,
        pp_rank=rank % pipeline_stages,
        dp_rank=rank // pipeline_stages,
        pipeline_stages=pipeline_stages,
        num_replicas=num_replicas,
        cpu_group=cpu_group,
    )


def add_tied_groups(
    groups: ProcessGroups, plan: PartitionPlan, rank: int, trainable: set[str], device: torch.device
) -> None:
    """Create the groups that sum gradients of parameters several stages hold. Collective."""
    if dist.is_initialized():
        groups.tied = _tied_groups(plan, rank, trainable)
        _warm_up([g for g, _ in groups.tied], device)


def _warm_up(groups: list[dist.ProcessGroup], device: torch.device) -> None:
    """One small all-reduce on each of ``groups`` (this rank's, in creation order, which is the
    same on every rank). NCCL creates a group's communicator at its first operation; left lazy,
    the first one on a pipeline group can be a two-rank ``batch_isend_irecv`` mixing sends and
    receives, for which NCCL leaves communicator creation undefined. Collective."""
    probe = torch.zeros(1, device=device)
    for group in groups:
        dist.all_reduce(probe, group=group)


def _tied_groups(plan: PartitionPlan, rank: int, trainable: set[str]) -> list[tuple[dist.ProcessGroup, list[str]]]:
    """For each replica, a group per set of pipeline positions that hold the same parameters."""
    positions: dict[str, set[int]] = {}
    for stage in plan.stages:
        for name in stage.tensor_names:
            if name in trainable:
                positions.setdefault(name, set()).add(plan.position_of(stage.stage_index))
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
    lets its threads finish (after a failure, NCCL's is aborted instead, see ``_end``)."""
    if dist.is_available() and dist.is_initialized():
        _end(None)


def note_failure() -> None:
    """This process failed (or was told a peer did): from now on NCCL groups are aborted."""
    global _failed
    _failed = True


def barrier(device: torch.device) -> None:
    """``dist.barrier`` on ``device``: NCCL's barrier otherwise guesses the GPU from the rank,
    which is wrong when ranks do not map to GPUs in order."""
    if device.type == "cuda" and dist.get_backend() == "nccl":
        dist.barrier(device_ids=[device.index if device.index is not None else torch.cuda.current_device()])
    else:
        dist.barrier()


def _end(group: dist.ProcessGroup | None) -> None:
    """Destroy ``group`` (``None``: every group). After a failure an NCCL group is aborted:
    destroying it waits for its pending operations, which dead peers never complete."""
    if _failed and dist.get_backend(group) == "nccl":
        abort_process_group(group)
    else:
        dist.destroy_process_group(group)
