"""ZeRO-3's gathers (``runtime/zero3.py``) over two gloo processes on this machine: each
parameter lives on one rank, the graph gathers it where it is used, backward keeps handles
instead of the gathered values and gathers them again, and each gradient is averaged onto the
rank holding the parameter."""

from __future__ import annotations

import os
import socket
import time
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import fx, nn

from lightning_rannc.runtime.mesh import ProcessGroups
from lightning_rannc.runtime.zero3 import GatheredParams, gather_in_graph

HOLDERS = {"w1": 0, "w2": 1}


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(4, 8, generator=generator))
        self.w2 = nn.Parameter(torch.randn(8, 3, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x @ self.w1).relu() @ self.w2.t().t()).pow(2).sum()  # a view of w2 is saved


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
        module = fx.symbolic_trace(_Net())
        params = GatheredParams(HOLDERS, groups, torch.device("cpu"))
        assert gather_in_graph(module, params, HOLDERS)
        gathered: list[weakref.ref[torch.Tensor]] = []
        gather = params.gather

        def counted(name: str) -> torch.Tensor:
            full = gather(name)
            gathered.append(weakref.ref(full))
            return full

        params.gather = counted  # type: ignore[method-assign]
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
        in_backward = len(gathered) - in_forward
        grads = {n: p.grad for n, p in module.named_parameters() if not p.is_meta and p.grad is not None}
        meta = sorted(n for n, p in module.named_parameters() if p.is_meta)
        with torch.no_grad():
            again = float(module(x))
        # Plain lists: a tensor sent through the queue would not outlive this process.
        grads_sent = {n: g.tolist() for n, g in grads.items()}
        expected_sent = {n: g.tolist() for n, g in expected.items()}
        queue.put((rank, float(loss.detach()), freed, in_forward, in_backward, grads_sent, expected_sent, meta, again))
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
    for rank, (loss, freed, in_forward, in_backward, grads, expected, meta, again) in results.items():
        assert loss == plain[rank] and again == plain[rank]  # the gathered values are the holders'
        assert freed, "the forward's gathered parameters outlived it"
        # Each gathered in forward; in backward only w2, which the input's gradient reads (the
        # input x needs none, so nothing unpacks w1).
        assert (in_forward, in_backward) == (2, 1)
        held = [n for n, holder in HOLDERS.items() if holder == rank]
        assert meta == [n for n in HOLDERS if n not in held]  # the other rank's parameter: a stand-in
        assert list(grads) == held
        for name in held:
            torch.testing.assert_close(torch.tensor(grads[name]), torch.tensor(expected[name]), rtol=1e-6, atol=1e-6)
