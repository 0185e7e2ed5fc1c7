"""How the example GPT's block times grow with the micro-batch, as the profiler measures them.

With ``micro_batches="auto"`` the planner times the blocks at a reference micro-batch (a quarter
of the batch), at the smallest it may pick and at the whole batch, and costs the sizes between
from those timings (``BlockCost.scaled``: the line through the two smaller ones, bent to meet
the larger one). This prints the blocks' summed forward and backward at every size, and what
the line through the two smallest sizes alone, and the planner's model of the three timings,
predict for the others: where time grows faster than the micro-batch (caches), the line
through small sizes alone falls short.

    python benchmarks/profile_sizes.py                    # 8 layers, d 128, seq 64, sizes 2 4 8 16
    python benchmarks/profile_sizes.py --sizes 2 4 8 16 32 --repeat 3
    # also the graph cut in two halves (two stages), each timed as one block: what timing every
    # block as its own forward and autograd backward adds to a stage the runtime runs whole
    python benchmarks/profile_sizes.py --halves --repeat 3

One process, one thread (as each rank of ``throughput.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _timings(args: argparse.Namespace) -> dict[int, tuple[float, float]]:
    """Per micro-batch size, the blocks' summed forward and backward (the fastest of the rounds)."""
    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    from lightning_rannc.capture.batch import FlatBatch
    from lightning_rannc.capture.export import capture_training_step
    from lightning_rannc.capture.graph import StepGraph, group_nodes
    from lightning_rannc.config import RaNNCConfig
    from lightning_rannc.profile.profiler import profile_blocks

    from gpt import GPT, make_dataloader

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(layers=args.layers, dim=args.dim, seq_len=args.seq, vocab_size=args.vocab)
    model.log = lambda *a, **k: None  # outside a Trainer
    batch = FlatBatch.of(next(iter(make_dataloader(max(args.sizes), args.seq, args.vocab))), "profile_sizes")
    best: dict[int, tuple[float, float]] = {}
    for _ in range(args.repeat):  # rounds over every size, so that a slow minute does not hit one size only
        for size in args.sizes:
            graph = StepGraph.from_captured(capture_training_step(model, batch.first(size)))
            spans = group_nodes(graph, RaNNCConfig().max_blocks)
            costs = profile_blocks(graph, batch.first_leaves(size), spans, RaNNCConfig().profile_repeats)
            timed = (sum(c.fwd_ms for c in costs), sum(c.bwd_ms for c in costs))
            best[size] = min(best.get(size, timed), timed)
    return best


def _halves(args: argparse.Namespace) -> dict[int, tuple[float, ...]]:
    """Per size: the block count, and forward and backward summed over the blocks and over the
    two halves of the graph each timed as one block (the fastest of the rounds, each sum)."""
    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    from lightning_rannc.capture.batch import FlatBatch
    from lightning_rannc.capture.export import capture_training_step
    from lightning_rannc.capture.graph import StepGraph, group_nodes
    from lightning_rannc.config import RaNNCConfig
    from lightning_rannc.profile.profiler import profile_blocks

    from gpt import GPT, make_dataloader

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(layers=args.layers, dim=args.dim, seq_len=args.seq, vocab_size=args.vocab)
    model.log = lambda *a, **k: None  # outside a Trainer
    batch = FlatBatch.of(next(iter(make_dataloader(max(args.sizes), args.seq, args.vocab))), "profile_sizes")
    best: dict[int, list[float]] = {}
    blocks: dict[int, int] = {}
    for _ in range(args.repeat):
        for size in args.sizes:
            graph = StepGraph.from_captured(capture_training_step(model, batch.first(size)))
            spans = group_nodes(graph, RaNNCConfig().max_blocks)
            middle = spans[len(spans) // 2][0]
            halves = [(spans[0][0], middle), (middle, spans[-1][1])]
            leaves, repeats = batch.first_leaves(size), RaNNCConfig().profile_repeats
            fine, whole = profile_blocks(graph, leaves, spans, repeats), profile_blocks(graph, leaves, halves, repeats)
            sums = [sum(c.fwd_ms for c in fine), sum(c.fwd_ms for c in whole)]
            sums += [sum(c.bwd_ms for c in fine), sum(c.bwd_ms for c in whole)]
            best[size] = [min(a, b) for a, b in zip(best.get(size, sums), sums)]
            blocks[size] = len(spans)
    return {size: (blocks[size], *best[size]) for size in best}


def _on_line(points: list[tuple[int, float]], size: int) -> float:
    """The time at ``size`` on the line through two ``(size, time)`` points."""
    (a, ta), (b, tb) = points
    return ta + (tb - ta) * (size - a) / (b - a)


def _planner(
    timings: dict[int, tuple[float, float]], sizes: list[int], reference: int
) -> dict[int, tuple[float, float]]:
    """Each size's forward and backward as the planner costs them from the timings at the
    smallest size, ``reference`` and the largest (summed over the blocks, as one block)."""
    from lightning_rannc.plan.cost_model import BlockCost, with_fixed_parts, with_larger_timing

    def cost(size: int) -> BlockCost:
        return BlockCost(
            start=0, end=1, fwd_ms=timings[size][0], bwd_ms=timings[size][1], activation_bytes=0, cut_bytes=0
        )

    model = cost(reference)
    if sizes[0] < reference:
        [model] = with_fixed_parts([model], [cost(sizes[0])], reference, sizes[0])
    if sizes[-1] > reference:
        [model] = with_larger_timing([model], [cost(sizes[-1])], reference, sizes[-1])
    return {size: (model.scaled(size / reference).fwd_ms, model.scaled(size / reference).bwd_ms) for size in sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--halves", action="store_true", help="also time the two halves of the graph whole")
    args = parser.parse_args()
    sizes = sorted(set(args.sizes))
    if len(sizes) < 3:
        parser.error("--sizes needs at least three sizes")
    timings = _timings(args)
    reference = sizes[-1] // 4 if sizes[-1] // 4 in sizes else sizes[1]
    planner = _planner(timings, sizes, reference)
    timed = sorted({sizes[0], reference, sizes[-1]})
    print(
        f"GPT layers={args.layers} dim={args.dim} seq={args.seq} vocab={args.vocab}: blocks summed, ms "
        f"(measured / on the line through {sizes[0]} and {sizes[1]} samples / as the planner costs it from "
        f"{', '.join(map(str, timed))})"
    )
    for size in sizes:
        cells = []
        for kind, index in (("forward", 0), ("backward", 1)):
            measured = timings[size][index]
            small = _on_line([(s, timings[s][index]) for s in sizes[:2]], size)
            three = planner[size][index]
            lines = f"{small:7.1f} ({measured / small:.2f}x) / {three:7.1f} ({measured / three:.2f}x)"
            cells.append(f"{kind} {measured:7.1f} / {lines}")
        print(f"  {size:4d} samples: " + "   ".join(cells))
    if args.halves:
        print("the blocks summed / the two halves of the graph each timed as one block, ms:")
        for size, (count, fine_fwd, whole_fwd, fine_bwd, whole_bwd) in sorted(_halves(args).items()):
            print(
                f"  {size:4d} samples, {count:.0f} blocks: forward {fine_fwd:7.1f} / {whole_fwd:7.1f} "
                f"({fine_fwd / whole_fwd:.2f}x)   backward {fine_bwd:7.1f} / {whole_bwd:7.1f} "
                f"({fine_bwd / whole_bwd:.2f}x)"
            )


if __name__ == "__main__":
    main()
