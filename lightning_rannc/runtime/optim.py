"""The user's optimizer, restricted to this rank's parameters, and its full state on demand.

The optimizer object from ``configure_optimizers`` is kept (LR schedulers hold it); only the
``params`` lists of its groups are filtered in place, so group hyperparameters and scheduler
updates keep working. With replicas, each parameter of a stage is updated by one replica only
(ZeRO stage 1: each replica holds about 1/D of the stage's optimizer state), which then
broadcasts the new values to the others. ``gather_optimizer_state`` rebuilds the state dict the
unpartitioned optimizer would have, so checkpoints look like a single-device run's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from lightning_rannc.runtime.checkpoint import LazyStates
from lightning_rannc.runtime.mesh import ProcessGroups
from lightning_rannc.runtime.state import gather_tensors

__all__ = [
    "keep_local_params",
    "gather_optimizer_state",
    "local_optimizer_state",
    "broadcast_from_owners",
    "clip_grad_norm",
]


def broadcast_from_owners(tensors: Mapping[str, torch.Tensor], owner: Mapping[str, int], groups: ProcessGroups) -> None:
    """After the optimizer step, copy every parameter from the replica that updated it. Collective
    over the replica group; one flat broadcast per replica."""
    for replica in range(groups.num_replicas):
        params = [tensors[n] for n in sorted(owner) if owner[n] == replica]
        if not params:
            continue
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        dist.broadcast(flat, src=groups.replica_rank(replica), group=groups.dp_group)
        with torch.no_grad():
            for param, chunk in zip(params, flat.split([p.numel() for p in params])):
                param.copy_(chunk.view_as(param))


def clip_grad_norm(
    params: list[torch.Tensor], counted: list[torch.Tensor], max_norm: float, group: Any, device: torch.device
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole pipeline.

    Lightning clips with the norm of this process's parameters only; the model's norm needs the
    squares of every stage's gradients, each parameter counted once (``counted``: the tensors
    this rank contributes), summed over the pipeline ``group``. All of ``params`` are scaled.
    The sum is made on ``device`` (the group's) even when this rank has no gradient: NCCL
    refuses CPU tensors.
    """
    grads = [p.grad for p in counted if p.grad is not None]
    total = torch.zeros((), dtype=torch.float64, device=device)
    if grads:
        total = torch.stack([g.detach().double().pow(2).sum().to(device) for g in grads]).sum()
    if dist.is_initialized():
        dist.all_reduce(total, group=group)
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for param in params:
        if param.grad is not None:
            param.grad.mul_(coef.to(param.grad.dtype))
    return norm.float()


def keep_local_params(optimizer: Optimizer, names: Mapping[int, str], local: set[str]) -> list[list[str]]:
    """Drop other stages' parameters from ``optimizer``; return every group's original names."""
    layout = []
    for group in optimizer.param_groups:
        layout.append([names[id(p)] for p in group["params"]])
        kept = [p for p in group["params"] if names[id(p)] in local]
        for param in group["params"]:
            if names[id(param)] not in local:
                optimizer.state.pop(param, None)
        group["params"] = kept
    return layout


def gather_optimizer_state(
    optimizer: Optimizer, layout: list[list[str]], names: Mapping[int, str], dst: int, group: Any = None
) -> dict[str, Any]:
    """The optimizer's full state dict on rank ``dst`` (empty elsewhere). Collective.

    Args:
        optimizer: the filtered optimizer.
        layout: what ``keep_local_params`` returned: each group's parameter names before filtering.
        names: ``id(parameter)`` -> canonical name.
        dst: the rank that receives the full state.
        group: the CPU group to gather over (``ProcessGroups.cpu_group``).
    """
    local = optimizer.state_dict()
    merged = gather_tensors(_state_by_name(optimizer, local, names), dst, group)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != dst:
        return {}
    return _full_state(local["param_groups"], layout, merged)


def local_optimizer_state(optimizer: Optimizer, layout: list[list[str]], names: Mapping[int, str]) -> dict[str, Any]:
    """This rank's share of the full optimizer state dict: the full dict's structure and indices,
    with state only for the parameters this rank's optimizer updates (for sharded checkpoints)."""
    local = optimizer.state_dict()
    return _full_state(local["param_groups"], layout, _state_by_name(optimizer, local, names))


def load_full_optimizer_state(
    optimizer: Optimizer, layout: list[list[str]], names: Mapping[int, str], full: Mapping[str, Any]
) -> None:
    """Load into the filtered ``optimizer`` its parameters' part of ``full``, a full (unsharded)
    optimizer state dict whose indices follow ``layout`` (each group's names before filtering).
    ``Optimizer.load_state_dict`` copies each state tensor to its parameter's device: only this
    rank's share is read (from a memory-mapped checkpoint, only its pages)."""
    index_of = {name: i for i, name in enumerate(n for group in layout for n in group)}
    wanted = [index_of[names[id(param)]] for group in optimizer.param_groups for param in group["params"]]
    saved_state = full.get("state", {})
    if isinstance(saved_state, LazyStates):  # a sharded checkpoint: only these, in one read
        saved_state = saved_state.read(wanted)
    state = {local: saved_state[index] for local, index in enumerate(wanted) if index in saved_state}
    groups, start = [], 0
    for group, saved in zip(optimizer.param_groups, full["param_groups"]):
        groups.append({**saved, "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _state_by_name(optimizer: Optimizer, local: dict[str, Any], names: Mapping[int, str]) -> dict[str, Any]:
    by_name: dict[str, Any] = {}
    index = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names.get(id(param))  # none: state this rank does not contribute
            if index in local["state"] and name is not None:
                by_name[name] = _to_cpu(local["state"][index])
            index += 1
    return by_name


def _full_state(groups: list[dict[str, Any]], layout: list[list[str]], merged: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, Any] = {}
    param_groups = []
    index = 0
    for group, names in zip(groups, layout):
        ids = []
        for name in names:
            if name in merged:
                state[index] = merged[name]
            ids.append(index)
            index += 1
        param_groups.append({**group, "params": ids})
    return {"state": state, "param_groups": param_groups}


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value
