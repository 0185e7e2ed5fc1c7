"""How fast can a pipeline of the example GPT be on this machine, before any runtime overhead?

Measures plain eager forward + backward of the whole model in one process (one thread) for the
batch and for each micro-batch size, then prints the best speed-up over one process that an
S-stage pipeline can reach with M micro-batches if the stages were perfectly balanced and
communication were free:

- 1F1B / GPipe: one process takes T(B); each stage runs M micro-batches of cost T(B/M)/S and
  the pipeline fills and drains over S-1 more, so the bound is T(B) / ((M + S - 1) * T(B/M) / S).
- no bubble at all (the limit zero-bubble schedules approach): T(B) / (M * T(B/M) / S).

Two busy processes on a 2-core machine also slow each other down (shared memory bandwidth and
cache): multiply by the DDP efficiency ``benchmarks/throughput.py`` prints (DDP samples/s over
twice one process's) to compare with measured pipeline runs.

    python benchmarks/pipeline_bound.py                      # batch 16 and 64, 2 stages
    python benchmarks/pipeline_bound.py --batch-size 32 --stages 2 --micro-batches 2,4,8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def step_ms(model: torch.nn.Module, batch_size: int, seq_len: int, vocab: int, repeats: int) -> float:
    """Median milliseconds of forward + backward on one batch of ``batch_size``."""
    tokens = torch.randint(0, vocab, (batch_size, seq_len))
    targets = torch.randint(0, vocab, (batch_size, seq_len))
    times = []
    for index in range(repeats + 3):  # three warm-up steps
        start = time.perf_counter()
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        loss.backward()
        if index >= 3:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", default="16,64", help="comma-separated batch sizes")
    parser.add_argument("--micro-batches", default="2,4,8,16")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "examples"))
    from gpt import GPT

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(layers=args.layers, dim=args.dim, seq_len=64)
    vocab, stages = model.hparams.vocab_size, args.stages
    print(f"GPT layers={args.layers} dim={args.dim} seq=64, one process, one thread; {stages} stages")
    for batch_size in map(int, args.batch_size.split(",")):
        whole = step_ms(model, batch_size, 64, vocab, args.repeats)
        print(f"batch {batch_size}: {whole:.1f} ms forward + backward in one process")
        for micro_batches in map(int, args.micro_batches.split(",")):
            if batch_size % micro_batches or micro_batches > batch_size:
                continue
            part = step_ms(model, batch_size // micro_batches, 64, vocab, args.repeats)
            stage = part / stages  # one micro-batch on one stage, perfectly balanced
            with_bubble = whole / ((micro_batches + stages - 1) * stage)
            no_bubble = whole / (micro_batches * stage)
            print(
                f"  M={micro_batches:2d} (micro-batch {batch_size // micro_batches:2d}: {part:6.1f} ms, "
                f"{part * micro_batches / whole:.2f}x the time per sample): bound {with_bubble:.2f}x with "
                f"the 1F1B bubble, {no_bubble:.2f}x without"
            )


if __name__ == "__main__":
    main()
