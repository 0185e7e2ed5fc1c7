"""Run ``measure_links`` on gloo CPU process groups of 2 and 3 ranks.

Usage: ``python measure_links.py OUT_DIR``. Forks the ranks (one import of the package for all),
and writes ``OUT_DIR/w{world}_l{local_world_size}_r{rank}.json`` with each rank's result and the
seconds the call took.
"""

import dataclasses
import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_rannc.runtime.links import measure_links

# World size -> the local_world_size values to measure with (each a separate collective call).
RUNS = {2: (2, 1), 3: (2, 3, 1)}


def _rank(rank: int, world: int, out_dir: Path) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(str(out_dir / f"store_{world}"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        for local_world_size in RUNS[world]:
            start = time.perf_counter()
            links = measure_links(torch.device("cpu"), local_world_size)
            seconds = time.perf_counter() - start
            record = {"links": dataclasses.asdict(links), "seconds": seconds, "describe": links.describe()}
            (out_dir / f"w{world}_l{local_world_size}_r{rank}.json").write_text(json.dumps(record))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    out_dir = Path(sys.argv[1])
    for world in RUNS:
        mp.start_processes(_rank, args=(world, out_dir), nprocs=world, join=True, start_method="fork")


if __name__ == "__main__":
    main()
