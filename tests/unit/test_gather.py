"""Gathering state in bounded pieces (``runtime/gather.py``): the bucketing, and a round trip
of tensors and nested optimizer state over two gloo processes on this machine."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_rannc.runtime import gather
from lightning_rannc.runtime.gather import buckets, gather_state


def test_buckets_keep_order_and_bound_each_message() -> None:
    sizes = [5, 5, 5, 20, 1, 1, 9]
    groups = list(buckets(sizes, 10))
    assert groups == [[0, 1], [2], [3], [4, 5], [6]]  # the 20 travels alone
    assert [i for g in groups for i in g] == list(range(len(sizes)))
    assert list(buckets([], 10)) == []


def test_one_process_returns_cpu_copies() -> None:
    local = {"w": torch.ones(3, requires_grad=True), "state": {"step": torch.tensor(2.0), "lr": 0.1}}
    merged = gather_state(local, dst=0)
    assert torch.equal(merged["w"], torch.ones(3)) and not merged["w"].requires_grad
    assert merged["state"]["lr"] == 0.1 and torch.equal(merged["state"]["step"], torch.tensor(2.0))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, port: int, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        gather.BUCKET_BYTES = 64  # several messages for these few tensors
        local = {
            f"r{rank}.w": torch.arange(40, dtype=torch.float32) + rank,
            f"r{rank}.flag": torch.tensor([True, False]),
            f"r{rank}.empty": torch.empty(0, 3),
            f"r{rank}.state": {"exp_avg": torch.full((3, 4), float(rank), dtype=torch.bfloat16), "step": 7},
        }
        on_zero = gather_state(local, dst=0)
        everywhere = gather_state(local, dst=None)
        queue.put((rank, sorted(on_zero), sorted(everywhere), on_zero.get("r1.state"), everywhere.get("r0.w")))
    finally:
        dist.destroy_process_group()


def test_two_ranks_gather_on_one_and_on_every_rank() -> None:
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _port()
    processes = [context.Process(target=_rank, args=(r, port, queue)) for r in range(2)]
    results = {}
    try:  # every wait is bounded, and a rank left hanging is killed
        for process in processes:
            process.start()
        for _ in processes:
            rank, on_zero, everywhere, state, weight = queue.get(timeout=100)
            results[rank] = (on_zero, everywhere, state, weight)
        for process in processes:
            process.join(timeout=30)
            assert process.exitcode == 0
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
    names = sorted(f"r{r}.{n}" for r in (0, 1) for n in ("w", "flag", "empty", "state"))
    assert results[0][0] == names and results[1][0] == []  # only rank 0 receives with dst=0
    assert results[0][1] == names and results[1][1] == names
    state = results[0][2]
    assert state["step"] == 7 and state["exp_avg"].dtype == torch.bfloat16 and torch.all(state["exp_avg"] == 1)
    assert torch.equal(results[1][3], torch.arange(40, dtype=torch.float32))
