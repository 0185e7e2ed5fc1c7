"""The user's optimizer, restricted to this rank's parameters, and its full state on demand.

The optimizer object from ``configure_optimizers`` is kept (LR schedulers hold it); only the
``params`` lists of its groups are filtered in place, so group hyperparameters and scheduler
updates keep working. ``gather_optimizer_state`` rebuilds the state dict the unpartitioned
optimizer would have, so checkpoints look like a single-device run's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_rannc.runtime.state import gather_tensors

__all__ = ["keep_local_params", "gather_optimizer_state"]


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
    optimizer: Optimizer, layout: list[list[str]], names: Mapping[int, str], dst: int
) -> dict[str, Any]:
    """The optimizer's full state dict on rank ``dst`` (empty elsewhere). Collective.

    Args:
        optimizer: the filtered optimizer.
        layout: what ``keep_local_params`` returned: each group's parameter names before filtering.
        names: ``id(parameter)`` -> canonical name.
        dst: the rank that receives the full state.
    """
    local = optimizer.state_dict()
    by_name: dict[str, Any] = {}
    index = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            if index in local["state"]:
                by_name[names[id(param)]] = _to_cpu(local["state"][index])
            index += 1
    merged = gather_tensors(by_name, dst)  # type: ignore[arg-type]
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != dst:
        return {}
    return _full_state(local["param_groups"], layout, merged)


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
