"""ZeRO-3 inside a stage: each parameter lives on one replica, gathered where it is used.

The replica whose optimizer updates a parameter (``Ownership.optimizer_owner``) is the only one
that holds it; the others keep a meta tensor of its shape. Every use in a stage's graph goes
through ``GatherParam``: the holder's value is broadcast over the replica group into a fresh
tensor, which the graph frees after its last use in the forward (fx drops values after their
last use). Autograd would keep it alive until backward through every operator that saves it
(a matmul saves its weight), so while a stage runs forward the saved-tensor hooks of
``GatheredParams.saving`` store a handle instead, and backward gathers the parameter again
when an operator unpacks it. The gather's own backward reduces the gradient of each
micro-batch onto the holder, averaged over replicas: no replica keeps another's gradients.

Why not FSDP2's ``fully_shard``: its gathers run in module hooks, and a stage here is one flat
graph of the whole step (``capture/split.py``), so it would gather the whole stage at once:
no saving at the peak. This is the per-parameter, graph-level variant (as SimpleFSDP does with
its all-gathers in the graph). Without prefetch: each gather waits for the broadcast.

Parameters tied across stages keep ZeRO-2's path (held by every replica, their gradients
summed over the stages first): their copies on other stages may have other holders.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn

from lightning_rannc.runtime.mesh import ProcessGroups

__all__ = ["GatheredParams", "gather_in_graph"]

GATHER_MODULE = "_gather_param"
"""The submodule name ``gather_in_graph`` gives its ``GatherParam``."""


@dataclass(frozen=True)
class _Saved:
    """A saved view of a gathered parameter, to gather again in backward."""

    name: str
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class GatheredParams:
    """The ZeRO-3 parameters of one rank's stages for one runtime: who holds each, and the
    values gathered for the backward now running."""

    def __init__(self, holders: Mapping[str, int], groups: ProcessGroups, device: torch.device) -> None:
        """``holders``: parameter -> the replica holding it (the same on every replica)."""
        self.group = groups.dp_group
        self.src = {name: groups.replica_rank(replica) for name, replica in holders.items()}
        self.mine = {name for name, replica in holders.items() if replica == groups.dp_rank}
        self.scale = 1.0 / groups.num_replicas
        self.device = device
        self.params: dict[str, torch.Tensor] = {}
        """The tensor of each parameter in the stage modules: the value on its holder, a meta
        tensor of its shape elsewhere."""
        self._live: dict[int, tuple[str, weakref.ref[torch.Tensor]]] = {}
        self._again: dict[str, torch.Tensor] = {}

    def gather(self, name: str) -> torch.Tensor:
        """The parameter's value on every replica of the stage. Collective over the replica group."""
        param = self.params[name]
        full = torch.empty(param.shape, dtype=param.dtype, device=self.device)
        if name in self.mine:
            full.copy_(param.detach())
        dist.broadcast(full, src=self.src[name], group=self.group)
        return full

    def gathered_for_forward(self, name: str) -> torch.Tensor:
        full = self.gather(name)
        self._live[full.untyped_storage().data_ptr()] = (name, weakref.ref(full))
        return full

    def reduce(self, name: str, grad: torch.Tensor) -> torch.Tensor | None:
        """One micro-batch's gradient of the parameter, averaged over the replicas onto its
        holder (``None`` elsewhere). Its backward is over: a value gathered again for it goes."""
        self._again.pop(name, None)
        grad = grad.detach().clone(memory_format=torch.contiguous_format)
        dist.reduce(grad, dst=self.src[name], group=self.group)
        return grad.mul_(self.scale) if name in self.mine else None

    def saving(self) -> Any:
        """Around a stage's forward: operators save handles to gathered parameters, not the values."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def forward_done(self) -> None:
        self._live.clear()

    def step_done(self) -> None:
        """After a schedule: drop what a backward gathered and never released (a parameter
        whose gradient did not reach it)."""
        self._again.clear()
        self._live.clear()

    def _pack(self, tensor: torch.Tensor) -> Any:
        if tensor.layout != torch.strided or tensor.device.type == "meta":
            return tensor
        entry = self._live.get(tensor.untyped_storage().data_ptr())
        full = entry[1]() if entry is not None else None
        if entry is None or full is None or full.dtype != tensor.dtype:
            return tensor
        return _Saved(entry[0], tensor.size(), tensor.stride(), int(tensor.storage_offset()))

    def _unpack(self, saved: Any) -> torch.Tensor:
        if not isinstance(saved, _Saved):
            return saved
        full = self._again.get(saved.name)
        if full is None:
            full = self._again[saved.name] = self.gather(saved.name)
        return full.as_strided(saved.size, saved.stride, saved.offset)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, param: torch.Tensor, params: GatheredParams, name: str) -> torch.Tensor:
        ctx.params, ctx.name = params, name
        return params.gathered_for_forward(name)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        return ctx.params.reduce(ctx.name, grad), None, None


class GatherParam(nn.Module):
    """The graph's call for a ZeRO-3 parameter: its value gathered from its holder."""

    def __init__(self, params: GatheredParams) -> None:
        super().__init__()
        self.gathered = params

    def forward(self, param: torch.Tensor, name: str) -> torch.Tensor:
        return _Gather.apply(param, self.gathered, name)


def gather_in_graph(module: fx.GraphModule, params: GatheredParams, holders: Mapping[str, int]) -> bool:
    """Route every use of a ZeRO-3 parameter in ``module`` through its gather; on the replicas
    not holding it, the module keeps a meta tensor of its shape. Returns whether any was."""
    graph = module.graph
    used = [n for n in graph.nodes if n.op == "get_attr" and str(n.target) in holders]
    if not used:
        return False
    module.add_submodule(GATHER_MODULE, GatherParam(params))
    for node in used:
        name = str(node.target)
        param = module.get_parameter(name)
        if name not in params.mine:
            param = _meta_param(module, name, param)
        params.params[name] = param
        with graph.inserting_after(node):
            gathered = graph.call_module(GATHER_MODULE, (node, name))
        gathered.meta = dict(node.meta)
        node.replace_all_uses_with(gathered)
        gathered.args = (node, name)  # the gather itself still reads the parameter
    module.recompile()
    return True


def _meta_param(module: nn.Module, name: str, param: torch.Tensor) -> nn.Parameter:
    """Put a meta tensor of ``param``'s shape in its place: another replica holds it."""
    owner_path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    meta = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    owner._parameters[leaf] = meta
    return meta
