"""Peak memory per rank as the pipeline gets deeper, for a GPT created on the meta device.

The module is built under ``trainer.init_module(empty_init=True)``: no process ever allocates
the whole model; each rank materialises its own stage. Prints, per layout and rank, the bytes of
parameters the rank holds and the peak resident memory of the process (``ru_maxrss``, which
includes about 0.4 GiB of Python, torch and Lightning).

    python benchmarks/memory.py                       # stages 1 and 2, GPT of ~100M parameters
    python benchmarks/memory.py --dim 1024 --layers 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train(stages: int, dim: int, layers: int) -> None:
    import lightning as L
    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    import lightning_rannc

    from gpt import GPT, make_dataloader

    class MetaGPT(GPT):
        def reset_parameters(self) -> None:  # the one parameter no layer initialises
            torch.nn.init.normal_(self.pos_emb, std=0.02)

    torch.set_num_threads(1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=stages,
        strategy=lightning_rannc.RaNNCStrategy(pipeline_stages=stages, micro_batches=2),
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with trainer.init_module(empty_init=True):
        model = MetaGPT(vocab_size=32000, dim=dim, layers=layers, heads=16, seq_len=32)
    trainer.fit(model, make_dataloader(4, 32, 32000, size=16))
    plan = trainer.strategy.plan
    local = {name for stage in plan.stages_of_rank(trainer.global_rank) for name in stage.tensor_names}
    held = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n in local)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    total = sum(p.numel() for p in model.parameters())
    # Each rank prints its own line: a collective right before exit can abort the process in
    # gloo's shutdown (see benchmarks/throughput.py), which made this benchmark fail now and then.
    row = {"stages": stages, "params": total, "rank": trainer.global_rank, "held": held, "peak": peak}
    print("RESULT " + json.dumps(row), flush=True)


def _run(stages: int, dim: int, layers: int) -> list[dict[str, float]]:
    """One rank's row each, in rank order, from a run of ``stages`` processes."""
    command = [sys.executable, __file__, "--run", str(stages), "--dim", str(dim), "--layers", str(layers)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    output = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800, check=True).stdout
    rows = [json.loads(x.removeprefix("RESULT ")) for x in output.splitlines() if x.startswith("RESULT ")]
    if sorted(row["rank"] for row in rows) != list(range(stages)):
        raise RuntimeError(f"expected one RESULT line from each of {stages} rank(s), got:\n{output}")
    return sorted(rows, key=lambda row: row["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    if args.run:
        _train(args.run, args.dim, args.layers)
        return
    for stages in args.stages:
        rows = _run(stages, args.dim, args.layers)
        print(f"{stages} stage(s), model {rows[0]['params'] / 1e6:.0f}M parameters:")
        for row in rows:
            held, peak = row["held"], row["peak"]
            print(
                f"  rank {row['rank']}: holds {held / 2**20:7.1f} MiB of parameters, peak RSS {peak / 2**30:5.2f} GiB"
            )


if __name__ == "__main__":
    main()
