"""ZeRO-3 inside a stage: each parameter lives on one replica, gathered where it is used.

The replica whose optimizer updates a parameter (``Ownership.optimizer_owner``) is the only one
that holds it; the others keep a meta tensor of its shape. Every use in a stage's graph goes
through ``GatherParam``. Parameters are gathered a unit at a time: those of one layer
(``layer_of``) with one holder and dtype, broadcast from the holder as one flat buffer at the
first use of any of them, each handed to the graph as a view, which the graph drops after its
last use in the forward (fx drops values after their last use); the buffer goes with the last.
Autograd would keep it alive until backward through every operator that saves a parameter (a
matmul saves its weight), so while a stage runs forward the saved-tensor hooks of
``GatheredParams.saving`` store a handle instead, and backward gathers the unit again when an
operator unpacks one. The gathers' backward collects the unit's gradients of the micro-batch
and reduces them, one flat buffer, onto the holder (averaged over replicas), which adds them
to its parameters' ``.grad``: no replica keeps another's gradients.

Prefetch: while one unit computes, the next one's broadcast runs. In forward the next is the
next unit of the stage module's graph (``gather_in_graph`` records the order); in backward,
the unit whose handles the forward saved before this one's (``_before``, learned from each
forward), since backward unpacks them in about the reverse order. A gradient's reduce is left
running until the next unit's reduce starts. Every replica runs the same graphs, so all of them
make the same guesses and issue the same collectives in the same order; a wrong guess costs a
broadcast and the memory of one unit until it is used or the step ends (``step_done``), never a
wrong value: parameters change only after the step.

Why not FSDP2's ``fully_shard``: its gathers run in module hooks, and a stage here is one flat
graph of the whole step (``capture/split.py``), so it would gather the whole stage at once:
no saving at the peak. This is a graph-level variant (as SimpleFSDP puts its all-gathers in
the graph).

Parameters tied across stages keep ZeRO-2's path (held by every replica, their gradients
summed over the stages first): their copies on other stages may have other holders.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn

from lightning_rannc._utils import layer_of
from lightning_rannc.runtime.mesh import ProcessGroups

__all__ = ["GatheredParams", "gather_in_graph"]

GATHER_MODULE = "_gather_param"
"""The submodule name ``gather_in_graph`` gives its ``GatherParam``."""

UnitKey = tuple[str, int, str]
"""(layer, holding replica, dtype): the parameters gathered and reduced together."""


@dataclass
class _Unit:
    key: UnitKey
    src: int
    """The holder's global rank."""
    names: list[str] = field(default_factory=list)
    params: list[torch.Tensor] = field(default_factory=list)

    @property
    def sizes(self) -> list[int]:
        return [p.numel() for p in self.params]


@dataclass(frozen=True)
class _Saved:
    """A saved view of a gathered unit's buffer, to gather again in backward."""

    unit: UnitKey
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class GatheredParams:
    """The ZeRO-3 parameters of one rank's stages for one runtime: who holds each, and what is
    gathered now."""

    def __init__(self, holders: Mapping[str, int], groups: ProcessGroups, device: torch.device) -> None:
        """``holders``: parameter -> the replica holding it (the same on every replica)."""
        self.holders = dict(holders)
        self.groups = groups
        self.group = groups.dp_group
        self.scale = 1.0 / groups.num_replicas
        self.device = device
        self.units: dict[UnitKey, _Unit] = {}
        self.unit_of: dict[str, _Unit] = {}
        self._handing: dict[UnitKey, dict[str, torch.Tensor]] = {}
        """Views of a unit gathered for the running forward, not yet asked for."""
        self._live: dict[int, tuple[UnitKey, weakref.ref[torch.Tensor]]] = {}
        self._again: dict[UnitKey, torch.Tensor] = {}
        """Units gathered again for the running backward."""
        self._grads: dict[UnitKey, dict[str, torch.Tensor]] = {}
        """The running backward's gradients of each unit, until the unit's last one."""
        self._pending: dict[UnitKey, tuple[torch.Tensor, Any]] = {}
        """Prefetched units: the buffer and its broadcast, still running."""
        self._reducing: list[tuple[_Unit, torch.Tensor, Any]] = []
        """Gradient reduces still running: the unit, its flat gradient and the reduce."""
        self._saved: list[UnitKey] = []
        """The units the running forward saved handles of, in order."""
        self._before: dict[UnitKey, UnitKey] = {}
        """Unit -> the unit a forward saved handles of just before it: backward's next."""

    def add(self, name: str, param: torch.Tensor) -> None:
        """Register the tensor of ``name`` in a stage module (every replica adds the same names in
        the same order, so the units match)."""
        if name in self.unit_of:
            return
        replica = self.holders[name]
        key = (layer_of(name), replica, str(param.dtype))
        unit = self.units.setdefault(key, _Unit(key, self.groups.replica_rank(replica)))
        unit.names.append(name)
        unit.params.append(param)
        self.unit_of[name] = unit

    def mine(self, name: str) -> bool:
        return self.holders[name] == self.groups.dp_rank

    def gather(self, unit: _Unit) -> torch.Tensor:
        """The unit's parameters, one flat buffer, on every replica: prefetched, or gathered now.
        Collective over the replicas."""
        pending = self._pending.pop(unit.key, None)
        if pending is None:
            pending = self._broadcast(unit)
        flat, work = pending
        work.wait()  # on a GPU the compute stream waits for the broadcast's, not the host
        return flat

    def prefetch(self, key: UnitKey | None) -> None:
        """Start the broadcast of unit ``key`` unless it is gathered or on its way already."""
        if key is None or key in self._pending or key in self._handing or key in self._again:
            return
        self._pending[key] = self._broadcast(self.units[key])

    def _broadcast(self, unit: _Unit) -> tuple[torch.Tensor, Any]:
        flat = torch.empty(sum(unit.sizes), dtype=unit.params[0].dtype, device=self.device)
        if unit.key[1] == self.groups.dp_rank:
            torch.cat([p.detach().reshape(-1) for p in unit.params], out=flat)
        return flat, dist.broadcast(flat, src=unit.src, group=self.group, async_op=True)

    def gathered_for_forward(self, name: str, following: Mapping[UnitKey, UnitKey]) -> torch.Tensor:
        """The parameter's value for the graph; ``following``: the graph's next unit after each."""
        unit = self.unit_of[name]
        handing = self._handing.get(unit.key)
        if handing is None or name not in handing:
            flat = self.gather(unit)
            self._live[flat.untyped_storage().data_ptr()] = (unit.key, weakref.ref(flat))
            views = flat.split(unit.sizes)
            handing = self._handing[unit.key] = {n: v.view_as(p) for n, v, p in zip(unit.names, views, unit.params)}
            self.prefetch(following.get(unit.key))
        view = handing.pop(name)
        if not handing:
            del self._handing[unit.key]
        return view

    def reduce(self, name: str, grad: torch.Tensor) -> None:
        """Collect one micro-batch's gradient of the parameter; at its unit's last, reduce them."""
        unit = self.unit_of[name]
        grads = self._grads.setdefault(unit.key, {})
        if name in grads:  # a new micro-batch, while a parameter of the last gave no gradient
            self._flush(unit)
            grads = self._grads.setdefault(unit.key, {})
        grads[name] = grad
        if len(grads) == len(unit.names):
            self._flush(unit)

    def _flush(self, unit: _Unit) -> None:
        """Start reducing the unit's gradients (zeros for those that got none) onto its holder,
        and finish the reduce before it. Its backward is over: a buffer gathered again for it
        goes."""
        grads = self._grads.pop(unit.key)
        self._again.pop(unit.key, None)
        flat = torch.zeros(sum(unit.sizes), dtype=unit.params[0].dtype, device=self.device)
        for name, chunk in zip(unit.names, flat.split(unit.sizes)):
            if name in grads:
                chunk.copy_(grads[name].reshape(-1))
        del grads
        work = dist.reduce(flat, dst=unit.src, group=self.group, async_op=True)
        self._reducing.append((unit, flat, work))
        while len(self._reducing) > 1:
            self._reduced(*self._reducing.pop(0))

    def _reduced(self, unit: _Unit, flat: torch.Tensor, work: Any) -> None:
        """A reduce finished: on the holder, the mean over the replicas joins its ``.grad``."""
        work.wait()
        if unit.key[1] != self.groups.dp_rank:
            return
        flat.mul_(self.scale)
        for param, chunk in zip(unit.params, flat.split(unit.sizes)):
            grad = chunk.view_as(param)
            param.grad = grad if param.grad is None else param.grad.add_(grad)

    def saving(self) -> Any:
        """Around a stage's forward: operators save handles to gathered parameters, not the values."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def forward_done(self) -> None:
        """After a stage's forward: what it gathered goes; the order it saved handles in says
        which unit backward needs after which."""
        self._handing.clear()
        self._live.clear()
        self._before.update(zip(self._saved[1:], self._saved[:-1]))
        self._saved.clear()

    def step_done(self) -> None:
        """After a schedule: reduce what units still wait for (a parameter whose gradient did
        not reach it; in the same order on every replica), finish every reduce and prefetch,
        drop what a backward gathered. The optimizer step comes next: nothing gathered may
        outlive it."""
        for key in sorted(self._grads):
            self._flush(self.units[key])
        while self._reducing:
            self._reduced(*self._reducing.pop(0))
        for _, work in self._pending.values():
            work.wait()
        self._pending.clear()
        self._again.clear()
        self.forward_done()

    def _pack(self, tensor: torch.Tensor) -> Any:
        if tensor.layout != torch.strided or tensor.device.type == "meta":
            return tensor
        entry = self._live.get(tensor.untyped_storage().data_ptr())
        flat = entry[1]() if entry is not None else None
        if entry is None or flat is None or flat.dtype != tensor.dtype:
            return tensor
        if entry[0] not in self._saved:
            self._saved.append(entry[0])
        return _Saved(entry[0], tensor.size(), tensor.stride(), int(tensor.storage_offset()))

    def _unpack(self, saved: Any) -> torch.Tensor:
        if not isinstance(saved, _Saved):
            return saved
        flat = self._again.get(saved.unit)
        if flat is None:
            flat = self._again[saved.unit] = self.gather(self.units[saved.unit])
            self.prefetch(self._before.get(saved.unit))
        return flat.as_strided(saved.size, saved.stride, saved.offset)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, param: torch.Tensor, params: GatheredParams, name: str, following: Mapping[UnitKey, UnitKey]
    ) -> torch.Tensor:
        ctx.params, ctx.name = params, name
        return params.gathered_for_forward(name, following)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None, None]:
        # The holder's gradient arrives with the unit's reduce (``GatheredParams._flush``).
        ctx.params.reduce(ctx.name, grad)
        return None, None, None, None


class GatherParam(nn.Module):
    """The graph's call for a ZeRO-3 parameter: its value gathered from its holder."""

    def __init__(self, params: GatheredParams) -> None:
        super().__init__()
        self.gathered = params
        self.following: dict[UnitKey, UnitKey] = {}
        """Each unit -> the next one this graph gathers (prefetched while the first computes)."""

    def forward(self, param: torch.Tensor, name: str) -> torch.Tensor:
        return _Gather.apply(param, self.gathered, name, self.following)


def gather_in_graph(module: fx.GraphModule, params: GatheredParams) -> bool:
    """Route every use of a ZeRO-3 parameter in ``module`` through its gather; on the replicas
    not holding it, the module keeps a meta tensor of its shape. Returns whether any was."""
    graph = module.graph
    used = [n for n in graph.nodes if n.op == "get_attr" and str(n.target) in params.holders]
    if not used:
        return False
    gather = GatherParam(params)
    module.add_submodule(GATHER_MODULE, gather)
    order: list[UnitKey] = []
    for node in used:
        name = str(node.target)
        param = module.get_parameter(name)
        if not params.mine(name):
            param = _meta_param(module, name, param)
        params.add(name, param)
        with graph.inserting_after(node):
            gathered = graph.call_module(GATHER_MODULE, (node, name))
        gathered.meta = dict(node.meta)
        node.replace_all_uses_with(gathered)
        gathered.args = (node, name)  # the gather itself still reads the parameter
        if params.unit_of[name].key not in order:
            order.append(params.unit_of[name].key)
    gather.following = dict(zip(order[:-1], order[1:]))
    module.recompile()
    return True


def _meta_param(module: nn.Module, name: str, param: torch.Tensor) -> nn.Parameter:
    """Put a meta tensor of ``param``'s shape in its place: another replica holds it."""
    owner_path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    meta = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    owner.register_parameter(leaf, meta)
    return meta
