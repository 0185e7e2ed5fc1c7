"""Peak tensor memory per rank against the plan's prediction and the memory limit L.

Four processes train a GPT (``examples/gpt.py``) created on the meta device, each with
``RaNNCStrategy(memory_limit=L)``; the planner picks the layout, micro-batches, checkpointing
and ZeRO stage. The defaults size the GPT so that one process training it alone needs more than
3.5 L: the script prints that footprint from the plan's memory model (parameters, gradients,
Adam's two moments, every stage's activations for the whole batch) and as measured in one
process with plain Lightning (run beside the four). Then, per rank, a markdown table: the plan's
predicted peak (the sum of ``StagePlan.memory["total"]`` over the rank's stages), the measured
peak, their ratio and L; then what was live at the peak, and the peak of each step.

Measured peak: the most bytes of CPU tensors live at once, from torch's profiler
(``profile_memory=True``: each allocation and release of the CPU allocator reports the bytes
live after it). It runs from ``on_train_start``, before the rank materialises its stages,
through every step: parameters, gradients, optimizer state, activations, receive buffers and
temporaries. Tensors made earlier (the data set) are not counted, nor is anything that is not a
tensor (Python, libraries: RSS would count them). The profiler sees the threads it was started
on and those autograd runs on: the training loop, the pipeline's schedule, the backward passes
(on CPU they run on the calling thread); the gloo transfers write into tensors made there.

    python benchmarks/memory.py                               # 4 processes, L = 160 MB
    python benchmarks/memory.py --dim 256 --seq 128 --limit 120MB
    python benchmarks/memory.py --stages 1 2                  # the older table: peak RSS per layout
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # gpt
MARKS = {7919: "step end", 7907: "optimizer step"}
"""Sizes of tensors allocated (and freed at once) at the end of each step and before its
optimizer step: their allocation events divide the profile into phases."""


def _build(dim: int, layers: int, vocab: int, seq: int, heads: int) -> Any:
    import torch

    from gpt import GPT

    class MetaGPT(GPT):
        def reset_parameters(self) -> None:  # the one parameter no layer initialises
            torch.nn.init.normal_(self.pos_emb, std=0.02)

    return MetaGPT(vocab_size=vocab, dim=dim, layers=layers, heads=heads, seq_len=seq)


def _trainer(devices: int, strategy: Any, steps: int, callbacks: list[Any] | None = None, accumulate: int = 1) -> Any:
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        accumulate_grad_batches=accumulate,
        devices=devices,
        strategy=strategy,
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def _peak_callback(start_now: bool = False) -> Any:
    """A callback profiling CPU memory from ``on_train_start`` (or from now) to ``on_train_end``;
    ``result`` then holds the peak live bytes per step and the breakdown of the last step's peak."""
    import lightning as L
    import torch
    from torch.profiler import ProfilerActivity, profile

    step_end, optimizer_step = MARKS

    class PeakMemory(L.Callback):
        def __init__(self) -> None:
            self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
            self.result: dict[str, Any] = {}
            if start_now:
                self.profiler.start()

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if not start_now:
                self.profiler.start()

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            torch.empty(optimizer_step, dtype=torch.uint8)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            torch.empty(step_end, dtype=torch.uint8)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.profiler.stop()
            state = [t for s in trainer.optimizers[0].state.values() for t in s.values() if torch.is_tensor(t)]
            kinds = {t.untyped_storage().data_ptr(): "optimizer" for t in state}
            kinds.update({p.untyped_storage().data_ptr(): "params" for p in pl_module.parameters() if not p.is_meta})
            self.result = _peaks(_allocations(self.profiler), kinds)

    return PeakMemory()


def _allocations(profiler: Any) -> list[tuple[int, int, int, int]]:
    """The CPU allocator's events in time order: (time, bytes (negative: a release), live bytes
    after it, address)."""
    events, pending = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        fields = node.extra_fields
        if type(fields).__name__.endswith("Allocation") and str(fields.device) == "cpu":
            events.append((node.start_time_ns, fields.alloc_size, fields.total_allocated, fields.ptr))
    return sorted(events)


def _peaks(events: list[tuple[int, int, int, int]], kinds: dict[int, str]) -> dict[str, Any]:
    """Peak live bytes of each step's forward and backward (up to the optimizer step) and of its
    optimizer step (to the step's end), and what was live at the last step's peak: parameters
    and optimizer state (``kinds``: address -> kind), other tensors made in earlier steps
    (gradients, receive buffers) and tensors made in that step."""
    phases: list[tuple[int, int]] = []  # (peak, index of its event), one per phase
    peak, at = 0, 0
    for index, (_, size, live, _) in enumerate(events):
        if size in MARKS:
            phases.append((peak, at))
            peak = 0
        elif live > peak:
            peak, at = live, index
    steps = [[phases[i][0], phases[i + 1][0]] for i in range(0, len(phases) - 1, 2)]
    last = max(phases[-2:])[1]
    owners: dict[int, tuple[int, int]] = {}  # address -> (bytes, step it was made in)
    step = 0
    for _, size, _, ptr in events[: last + 1]:
        if MARKS.get(size) == "step end":
            step += 1
        elif size > 0:
            owners[ptr] = (size, step)
        elif size < 0:
            owners.pop(ptr, None)
    breakdown = dict.fromkeys(["params", "optimizer", "earlier steps", "this step"], 0)
    for ptr, (size, made) in owners.items():
        breakdown[kinds.get(ptr, "earlier steps" if made < step else "this step")] += size
    return {"steps": steps, "peak": max(map(max, steps)), "at_last_peak": breakdown}


def _train_measured(args: argparse.Namespace) -> None:
    """One rank of the measured run: train, then print this rank's RESULT line."""
    import torch

    import lightning_rannc

    from gpt import make_dataloader

    torch.set_num_threads(1)
    torch.manual_seed(0)
    callback = _peak_callback()
    strategy = lightning_rannc.RaNNCStrategy(
        memory_limit=args.limit,
        pipeline_stages=args.pipeline_stages,
        activation_checkpointing="auto",
        measure_links=False,  # the preset's links: the same layout on every run
    )
    trainer = _trainer(args.devices, strategy, args.steps, [callback], args.accumulate_grad_batches)
    with trainer.init_module(empty_init=True):
        model = _build(args.dim, args.layers, args.vocab, args.seq, args.heads)
    size = args.batch_size * args.steps * args.devices * args.accumulate_grad_batches
    trainer.fit(model, make_dataloader(args.batch_size, args.seq, args.vocab, size=size))
    plan, rank = trainer.strategy.plan, trainer.global_rank
    stages = plan.stages_of_rank(rank)
    row = {
        "rank": rank,
        "stages": [s.stage_index for s in stages],
        "predicted": {k: sum(s.memory.get(k, 0) for s in stages) for k in stages[0].memory},
        "measured": callback.result,
    }
    if rank == 0:  # short: a line longer than a pipe's atomic write could mix with another rank's
        row["plan"] = _summary(plan)
        row["footprint"] = _footprint(model, plan)
    # Each rank prints its own line: a collective right before exit can abort the process in
    # gloo's shutdown (see benchmarks/throughput.py), which made this benchmark fail now and then.
    _emit(row)


def _train_single(args: argparse.Namespace) -> None:
    """The same GPT, batch and optimizer in one process with plain Lightning, profiled from
    before the module is built; prints one RESULT line."""
    import torch

    from gpt import make_dataloader

    torch.set_num_threads(1)
    torch.manual_seed(0)
    callback = _peak_callback(start_now=True)
    trainer = _trainer(1, "auto", args.steps, [callback])
    model = _build(args.dim, args.layers, args.vocab, args.seq, args.heads)
    trainer.fit(model, make_dataloader(args.batch_size, args.seq, args.vocab, size=args.batch_size * args.steps))
    _emit({"rank": 0, "measured": callback.result})


def _summary(plan: Any) -> dict[str, Any]:
    """What the report shows of the plan: its layout and each stage's modules."""
    checkpointed = [s.stage_index for s in plan.stages if s.checkpoint]
    return {
        "layout": (
            f"{plan.pipeline_stages} stage(s) x {plan.num_replicas} replica(s), {plan.num_microbatches} "
            f"micro-batch(es) of {plan.microbatch_size}, schedule {plan.schedule}"
            f"{' as zero bubble' if plan.zero_bubble else ''}, activation checkpointing "
            f"{'on stages ' + ', '.join(map(str, checkpointed)) if checkpointed else 'off'}, "
            f"ZeRO-{plan.zero_stage if plan.num_replicas > 1 else 0}"
        ),
        "spans": [s.module_span for s in plan.stages],
    }


def _footprint(model: Any, plan: Any) -> dict[str, int]:
    """One process training the whole GPT on one replica's batch, from the plan's memory model:
    parameters, gradients and Adam's two moments, and every stage's saved activations for every
    micro-batch (the meta module gives the sizes, each tied weight once)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    activations = sum(s.activation_bytes for s in plan.stages) * plan.num_microbatches
    return {"params": params, "grads": params, "optimizer": 2 * params, "activations": activations}


def _train_rss(stages: int, dim: int, layers: int, vocab: int) -> None:
    """One rank of the older table: parameters held and peak RSS, ``stages`` stages."""
    import torch

    import lightning_rannc

    from gpt import make_dataloader

    torch.set_num_threads(1)
    trainer = _trainer(stages, lightning_rannc.RaNNCStrategy(pipeline_stages=stages, micro_batches=2), 2)
    with trainer.init_module(empty_init=True):
        model = _build(dim, layers, vocab, 32, 16)
    trainer.fit(model, make_dataloader(4, 32, vocab, size=16))
    plan = trainer.strategy.plan
    local = {name for stage in plan.stages_of_rank(trainer.global_rank) for name in stage.tensor_names}
    held = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n in local)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    total = sum(p.numel() for p in model.parameters())
    row = {"stages": stages, "params": total, "rank": trainer.global_rank, "held": held, "peak": peak}
    _emit(row)


def _emit(row: dict[str, Any]) -> None:
    # The whole line in one write (atomic on a pipe): the ranks share stdout.
    sys.stdout.write("RESULT " + json.dumps(row) + "\n")
    sys.stdout.flush()


def _start(argv: list[str]) -> subprocess.Popen[str]:
    """Run this script with ``argv`` (with ``devices > 1``, Lightning starts the other ranks)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, *argv]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _rows(process: subprocess.Popen[str], ranks: int, timeout: float) -> list[dict[str, Any]]:
    """One RESULT row per rank of a run ``_start`` began, in rank order."""
    output, errors = process.communicate(timeout=timeout)
    # Every row after a tag, even with other output on its line: CI once read
    # 'RESULT {...}' followed by more text on the same line ("Extra data").
    decoder = json.JSONDecoder()
    rows = [decoder.raw_decode(output, found.end())[0] for found in re.finditer("RESULT ", output)]
    if process.returncode != 0 or sorted(row["rank"] for row in rows) != list(range(ranks)):
        raise RuntimeError(
            f"expected one RESULT line from each of {ranks} rank(s) and exit code 0, got {process.returncode}:\n"
            f"{output[-4000:]}\n{errors[-4000:]}"
        )
    return sorted(rows, key=lambda row: row["rank"])


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def _report(rows: list[dict[str, Any]], single: dict[str, Any], limit: int) -> None:
    plan, footprint = rows[0]["plan"], rows[0]["footprint"]
    print(f"plan: {plan['layout']}")
    whole = sum(footprint.values())
    parts = ", ".join(f"{k} {_mib(v)}" for k, v in footprint.items())
    print(f"one-process footprint (the plan's memory model): {_mib(whole)} = {whole / limit:.2f} L ({parts})")
    measured = single["measured"]["peak"]
    print(f"one process with plain Lightning, measured peak: {_mib(measured)} = {measured / limit:.2f} L")
    print(f"L = memory_limit = {_mib(limit)} per process\n")
    print("| rank | stage(s) | modules | predicted peak | measured peak | measured / predicted | L | measured / L |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        predicted, measured = row["predicted"]["total"], row["measured"]["peak"]
        spans = "; ".join(plan["spans"][i] for i in row["stages"])
        print(
            f"| {row['rank']} | {', '.join(map(str, row['stages']))} | {spans} | {_mib(predicted)} | "
            f"{_mib(measured)} | {measured / predicted:.2f} | {_mib(limit)} | {measured / limit:.2f} |"
        )
    print("\nAt the last step's peak, MiB: predicted by the plan (its total counts once what grads and")
    print("activations share) | measured: what was live, by kind or by when it was allocated")
    print(
        "| rank | params | grads | optimizer | activations | buffers | counted once | "
        "params | optimizer | before the step | in the step |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        predicted, measured = row["predicted"], row["measured"]["at_last_peak"]
        kinds = ("params", "grads", "optimizer", "activations", "buffers")
        cells = [predicted[k] for k in kinds] + [-predicted.get("shared", 0), *measured.values()]
        print(f"| {row['rank']} | " + " | ".join(f"{v / 2**20:.1f}" for v in cells) + " |")
    print("\nMeasured peak of each step, MiB (forward and backward / optimizer step):")
    for row in rows:
        steps = ", ".join(f"{a / 2**20:.1f} / {b / 2**20:.1f}" for a, b in row["measured"]["steps"])
        print(f"  rank {row['rank']}: {steps}")


def _rss_tables(args: argparse.Namespace) -> None:
    for stages in args.stages:
        argv = ["--child", "rss", "--stages", str(stages), "--dim", str(args.dim), "--layers", str(args.layers)]
        argv += ["--vocab", str(args.vocab)]
        rows = _rows(_start(argv), stages, timeout=1800)
        print(f"{stages} stage(s), model {rows[0]['params'] / 1e6:.0f}M parameters:")
        for row in rows:
            held, peak = row["held"], row["peak"]
            print(
                f"  rank {row['rank']}: holds {held / 2**20:7.1f} MiB of parameters, peak RSS {peak / 2**30:5.2f} GiB"
            )


def _stages(text: str) -> int | str:
    return text if text == "auto" else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=["pipeline", "single", "rss"], help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument(
        "--vocab", type=int, help="vocabulary (the tied embedding and head): 1024, or 32000 with --stages"
    )
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="samples per batch (per replica)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--accumulate-grad-batches", type=int, default=1, help="the Trainer's (the pipelined run only)")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--limit", default="160MB", help="memory_limit of each process (L): bytes, or like 160MB")
    parser.add_argument("--pipeline-stages", type=_stages, default="auto", help='"auto" (default) or a number')
    parser.add_argument("--stages", type=int, nargs="+", help="the older table instead: peak RSS per stage count")
    args = parser.parse_args()
    args.vocab = args.vocab or (32000 if args.stages else 1024)
    if args.child == "pipeline":
        _train_measured(args)
    elif args.child == "single":
        _train_single(args)
    elif args.child == "rss":
        _train_rss(args.stages[0], args.dim, args.layers, args.vocab)
    elif args.stages:
        _rss_tables(args)
    else:
        from lightning_rannc.plan.devices import parse_bytes

        # Both at once: tensor memory does not depend on how busy the cores are.
        pipeline, single = (_start([*sys.argv[1:], "--child", child]) for child in ("pipeline", "single"))
        _report(_rows(pipeline, args.devices, 900), _rows(single, 1, 900)[0], parse_bytes(args.limit))


if __name__ == "__main__":
    main()
