"""ZeRO-3's gathers (``runtime/zero3.py``) over two gloo processes on this machine: each
parameter lives on one rank, the graph gathers it where it is used (the next unit prefetched),
backward keeps handles instead of the gathered values and gathers them again (prefetched in
the reverse of the order forward saved them), and each gradient is averaged onto the rank
holding the parameter."""

from __future__ import annotations

import os
import socket
import time
import weakref
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import fx, nn

from lightning_rannc.runtime.mesh import ProcessGroups
from lightning_rannc.runtime.zero3 import GatheredParams, gather_in_graph

HOLDERS = {"layers.0.weight": 0, "layers.0.bias": 0, "layers.1.weight": 1, "layers.1.bias": 0}
"""Layer 0 is one unit (held by rank 0), layer 1 two: its weight on rank 1, its bias on rank 0."""


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(4, 8), nn.Linear(8, 3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](self.layers[0](x).relu()).pow(2).sum()


class _Flat(fx.Tracer):
    """Trace into every module, so that parameters are graph attributes (as in a stage)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return False


def _traced(net: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(net, _Flat().trace(net))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, port: int, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(rank + 1))
        plain = _Net()
        plain(x).backward()
        expected = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
        for grad in expected.values():  # what DDP would give: the mean over the ranks
            dist.all_reduce(grad)
            grad.div_(2)
        world = dist.group.WORLD
        groups = ProcessGroups(
            mesh=None, pp_group=None, dp_group=world, pp_rank=0, dp_rank=rank, pipeline_stages=1, num_replicas=2
        )
        module = _traced(_Net())
        params = GatheredParams(HOLDERS, groups, torch.device("cpu"))
        assert gather_in_graph(module, params)
        gathered: list[weakref.ref[torch.Tensor]] = []
        prefetched: list[bool] = []
        gather = params.gather

        def counted(unit: Any) -> torch.Tensor:
            prefetched.append(unit.key in params._pending)
            flat = gather(unit)
            gathered.append(weakref.ref(flat))
            return flat

        params.gather = counted  # type: ignore[method-assign]
        reduced: list[Any] = []
        flush = params._flush

        def counted_flush(unit: Any) -> None:
            reduced.append(unit.key)
            flush(unit)

        params._flush = counted_flush  # type: ignore[method-assign]
        with params.saving():
            loss = module(x)
        params.forward_done()
        # The graph keeps handles, not the values. gloo's finished broadcasts let go of their
        # tensors from gloo's own thread, a moment later: wait for that, not for backward.
        for _ in range(200):
            freed = all(ref() is None for ref in gathered)
            if freed:
                break
            time.sleep(0.01)
        in_forward = len(gathered)
        loss.backward()
        params.step_done()  # as the runtime does after a schedule: the last reduce finishes
        in_backward = len(gathered) - in_forward
        collectives = (in_forward, in_backward, len(reduced))
        grads = {n: p.grad for n, p in module.named_parameters() if not p.is_meta and p.grad is not None}
        meta = sorted(n for n, p in module.named_parameters() if p.is_meta)
        # With an input that needs a gradient, backward reads both layers' weights: the second
        # one it needs (layer 0's) is on its way while layer 1's backward runs.
        for param in module.parameters():
            param.grad = None
        del prefetched[:]
        leaf = x.clone().requires_grad_()
        with params.saving():
            loss = module(leaf)
        params.forward_done()
        forward_prefetches = list(prefetched)
        loss.backward()
        params.step_done()
        backward_prefetches = prefetched[len(forward_prefetches) :]
        plain_leaf = x.clone().requires_grad_()
        _Net()(plain_leaf).backward()
        leaf_grad_right = torch.allclose(leaf.grad, plain_leaf.grad, rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            again = float(module(x))
        # Plain lists: a tensor sent through the queue would not outlive this process.
        grads_sent = {n: g.tolist() for n, g in grads.items()}
        expected_sent = {n: g.tolist() for n, g in expected.items()}
        prefetches = (forward_prefetches, backward_prefetches, leaf_grad_right)
        queue.put((rank, float(loss.detach()), freed, collectives, grads_sent, expected_sent, meta, again, prefetches))
    finally:
        dist.destroy_process_group()


def test_each_parameter_lives_on_one_rank_and_backward_gathers_it_again() -> None:
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _port()
    processes = [context.Process(target=_rank, args=(r, port, queue)) for r in range(2)]
    results = {}
    try:  # every wait is bounded, and a rank left hanging is killed
        for process in processes:
            process.start()
        for _ in processes:
            rank, *result = queue.get(timeout=100)
            results[rank] = result
        for process in processes:
            process.join(timeout=30)
            assert process.exitcode == 0
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
    inputs = {rank: torch.randn(5, 4, generator=torch.Generator().manual_seed(rank + 1)) for rank in (0, 1)}
    plain = {rank: float(_Net()(x)) for rank, x in inputs.items()}
    for rank, (loss, freed, collectives, grads, expected, meta, again, prefetches) in results.items():
        assert loss == plain[rank] and again == plain[rank]  # the gathered values are the holders'
        assert freed, "the forward's gathered parameters outlived it"
        # Each unit gathered once in forward; in backward only layer 1's weight's, which the
        # gradient of layer 0's output reads (x needs none: nothing unpacks layer 0's weight,
        # and a bias is never saved); each unit's gradients reduced once.
        assert collectives == (3, 1, 3)
        # Forward: layer 0's unit is gathered, each next unit was prefetched while the one
        # before it computed. Backward: layer 1's weight first, then layer 0's, prefetched.
        assert prefetches == ([False, True, True], [False, True], True)
        held = [n for n, holder in HOLDERS.items() if holder == rank]
        assert meta == sorted(n for n in HOLDERS if n not in held)  # the other rank's parameter: a stand-in
        assert sorted(grads) == sorted(held)
        for name in held:
            torch.testing.assert_close(torch.tensor(grads[name]), torch.tensor(expected[name]), rtol=1e-6, atol=1e-6)
