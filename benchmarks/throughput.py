"""Throughput and memory of the example GPT: plain Lightning, DDP and RaNNCStrategy layouts.

Every run is a fresh script started with one thread per process (so that 2 processes on a
2-core machine compare with 1 process fairly), timed after warm-up steps, and repeated: the
machine is noisy, so compare the ratios inside one repetition. Samples/s counts the global
batch: DDP and data-parallel replicas read one batch per process, a pipeline one per pipeline.

    python benchmarks/throughput.py                 # all layouts, 2 repetitions
    python benchmarks/throughput.py --repeat 3 --steps 40
    python benchmarks/throughput.py --only rannc_s2_d1_m8,rannc_s2_d1_m8_zb   # a subset
    # issue 17's large-head GPT: a 32k-word (tied) head, about 70% of the time
    python benchmarks/throughput.py --layers 4 --dim 256 --seq 128 --vocab 32768 --only ddp_2proc,rannc_auto
    # memory-bound: every rannc run under a memory limit that DDP's whole state exceeds; the
    # automatic plan against the best hand-forced layout that fits (a forced one that does not
    # fit says so), in each repetition and, over several, median against median
    python benchmarks/throughput.py --memory-limit 40MB
    # each rannc run plans (profiles) at its first repetition only and reuses that plan after
    # (RaNNCStrategy(deployment=...)): the predictions stay one profile's, so the repetitions
    # scatter by the runs' own times only, not also by the profiles'
    python benchmarks/throughput.py --repeat 3 --plan-once plans/
    # every process (one process and DDP too) with glibc's malloc keeping what it frees
    python benchmarks/throughput.py --keep-freed-memory
    # each rannc run also records a runtime trace of its steps and prints every stage's predicted
    # and measured forward and backward (medians), as `python -m lightning_rannc show --measured`
    python benchmarks/throughput.py --only rannc_s2_d1_m8 --trace traces/
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    # name: (devices, strategy description)
    "lightning_1proc": (1, "auto"),
    "ddp_2proc": (2, "ddp"),
    # pure data parallelism needs no micro-batches; a 2-stage pipeline needs some to fill
    "rannc_s1_d2": (2, {"pipeline_stages": 1, "micro_batches": 1}),
    # the same with each ZeRO stage forced: 0 is DDP's exchange, 2 reduces each gradient to its owner
    "rannc_s1_d2_zero0": (2, {"pipeline_stages": 1, "micro_batches": 1, "zero_stage": 0}),
    "rannc_s1_d2_zero1": (2, {"pipeline_stages": 1, "micro_batches": 1, "zero_stage": 1}),
    "rannc_s1_d2_zero2": (2, {"pipeline_stages": 1, "micro_batches": 1, "zero_stage": 2}),
    # 3: each parameter on one replica, gathered where a micro-batch uses it
    "rannc_s1_d2_zero3": (2, {"pipeline_stages": 1, "micro_batches": 1, "zero_stage": 3}),
    # the optimizer state and its step on the host (on a CPU the host is the device: forced only)
    "rannc_s1_d2_offload": (2, {"pipeline_stages": 1, "micro_batches": 1, "offload_optimizer": True}),
    # what a user forces where memory binds: recompute activations, or smaller micro-batches
    "rannc_s1_d2_ckpt": (2, {"pipeline_stages": 1, "micro_batches": 1, "activation_checkpointing": True}),
    "rannc_s1_d2_m4_zero2": (2, {"pipeline_stages": 1, "micro_batches": 4, "zero_stage": 2}),
    "rannc_s1_d2_m8_zero2": (2, {"pipeline_stages": 1, "micro_batches": 8, "zero_stage": 2}),
    "rannc_s2_d1": (2, {"pipeline_stages": 2, "micro_batches": 4}),
    "rannc_s2_d1_m8": (2, {"pipeline_stages": 2, "micro_batches": 8}),
    "rannc_s2_d1_gpipe": (2, {"pipeline_stages": 2, "micro_batches": 2, "schedule": "gpipe"}),
    # two virtual stages per rank: half the fill and drain, twice the sends
    "rannc_s2_d1_m8_v2": (2, {"pipeline_stages": 2, "micro_batches": 8, "virtual_stages": 2}),
    # 1F1B with each backward split into input and weight gradients (zero bubble, ZB1P)
    "rannc_s2_d1_m8_zb": (2, {"pipeline_stages": 2, "micro_batches": 8, "zero_bubble": True}),
    # the same with the two micro-batches the automatic two-stage plan tends to pick: profiled at
    # that size, where the automatic plan scales a profile of smaller micro-batches up to it
    "rannc_s2_d1_m2_zb": (2, {"pipeline_stages": 2, "micro_batches": 2, "zero_bubble": True}),
    # zero bubble over two stages a rank placed in a V (ZB-V): rank 0 runs the first and last stage
    "rannc_s2_d1_m8_zbv": (2, {"pipeline_stages": 2, "micro_batches": 8, "schedule": "zbv"}),
    # two stages, the planner's choice of micro-batches and schedule
    "rannc_s2_d1_auto": (2, {"pipeline_stages": 2, "micro_batches": "auto"}),
    # the planner's own choice of layout and micro-batch count
    "rannc_auto": (2, {"pipeline_stages": "auto", "micro_batches": "auto"}),
}


def _train(args: argparse.Namespace) -> None:
    """One run (inside Lightning's processes); rank 0 prints a JSON line of results."""
    import lightning as L
    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    import lightning_rannc

    from gpt import GPT, make_dataloader

    name, steps, warmup, batch_size = args.run, args.steps, args.warmup, args.batch_size
    torch.set_num_threads(1)
    devices, strategy = RUNS[name]
    if isinstance(strategy, dict):
        limit = {"memory_limit": args.memory_limit} if args.memory_limit else {}
        saved = {"deployment": str(Path(args.plan_once) / f"{name}.json")} if args.plan_once else {}
        traced = {"trace": str(Path(args.trace) / f"{name}.trace.json"), "trace_steps": warmup + steps}
        strategy = lightning_rannc.RaNNCStrategy(**strategy, **limit, **saved, **(traced if args.trace else {}))

    class Timer(L.Callback):
        start = 0.0

        def on_train_batch_start(self, trainer, module, batch, idx):
            if trainer.global_step == warmup:
                self.start = time.perf_counter()

    L.seed_everything(0, verbose=False)
    seq, vocab = args.seq, args.vocab
    model = GPT(layers=args.layers, dim=args.dim, seq_len=seq, vocab_size=vocab)
    timer = Timer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    loader = make_dataloader(batch_size, seq, vocab, size=batch_size * (warmup + steps) * 2)
    trainer.fit(model, loader)
    elapsed = time.perf_counter() - timer.start
    # Every rank prints its own memory: a collective just before the process exits races with
    # gloo's worker thread, which may free the collective's tensors after Python began shutting
    # down ("terminate called without an active exception", exit code 134).
    _emit("MEMORY ", {"rank": trainer.global_rank, "memory": _memory(trainer, model)})
    if trainer.is_global_zero:
        layout = getattr(trainer.strategy, "layout", None)  # RaNNCStrategy's stages x replicas
        replicas = devices if strategy == "ddp" else (layout.num_replicas if layout is not None else 1)
        samples = steps * batch_size * replicas
        result = {"run": name, "samples_per_s": samples / elapsed, "ms": elapsed / steps * 1e3}
        plan = getattr(trainer.strategy, "plan", None)
        if plan is not None and args.trace:  # for the comparison with the trace (_compared)
            plan.save(Path(args.trace) / f"{name}.plan.json")
        if plan is not None:  # the planner's predictions, to compare with what was measured
            result["predicted_ms"] = plan.predicted_step_ms
            result["predicted_memory"] = [[s.memory["params"], s.memory["optimizer"]] for s in plan.stages]
            result["layout"] = (
                f"S={plan.pipeline_stages} D={plan.num_replicas} V={plan.virtual_stages} M={plan.num_microbatches} "
                f"{plan.schedule}{' zero bubble' if plan.zero_bubble else ''} ZeRO-{plan.zero_stage}"
                f"{', optimizer offloaded' if plan.offload_optimizer else ''}"
            )
        _emit("RESULT ", result)


def _emit(tag: str, record: dict) -> None:
    # one write, atomic on a pipe: the ranks share stdout and print at the same moment
    sys.stdout.write(tag + json.dumps(record) + "\n")
    sys.stdout.flush()


def _memory(trainer, model) -> list[int]:
    """Bytes of parameters this process holds, and of its optimizer state, at the end of training."""
    import torch

    plan = getattr(trainer.strategy, "plan", None)
    params = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    if plan is not None:  # after fit the module was gathered again: count the stage's (ZeRO-3: held)
        local = {name for stage in plan.stages_of_rank(trainer.global_rank) for name in stage.tensor_names}
        local -= trainer.strategy.engine.pipeline.ownership.elsewhere
        params = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n in local)
    state = trainer.optimizers[0].state.values()
    optimizer = sum(t.numel() * t.element_size() for s in state for t in s.values() if torch.is_tensor(t) and t.dim())
    return [params, optimizer]


# glibc's malloc hands large freed blocks back to the kernel (mmap'ed blocks are unmapped, the
# heap's top trimmed), and the next step faults those pages in again: on this CPU a two-stage
# zero-bubble step with two micro-batches spent 6 ms of its last input pass on that (traced:
# 22 ms, 16 with these settings). Every run of `--keep-freed-memory` gets them, one process too.
KEEP_FREED_MEMORY = {
    "MALLOC_MMAP_THRESHOLD_": str(10**9),
    "MALLOC_TRIM_THRESHOLD_": str(10**9),
    "MALLOC_TOP_PAD_": str(10**8),
}


def _launch(name: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(KEEP_FREED_MEMORY if args.keep_freed_memory else {})}
    command = [sys.executable, __file__, "--run", name, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--batch-size", str(args.batch_size), "--layers", str(args.layers), "--dim", str(args.dim)]
    command += ["--seq", str(args.seq), "--vocab", str(args.vocab)]
    command += ["--memory-limit", args.memory_limit] if args.memory_limit else []
    command += ["--plan-once", args.plan_once] if args.plan_once else []
    command += ["--trace", args.trace] if args.trace else []
    for attempt in (1, 2):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        problem = f"exited with {done.returncode}"
        refusal = re.search(r"PlanError: (The model does not fit[^\n]*)", done.stderr)
        if done.returncode != 0 and refusal:  # a forced layout over the memory limit: a result too
            return {"run": name, "does_not_fit": refusal.group(1)}
        if done.returncode == 0:
            try:
                return {**_result(done.stdout, RUNS[name][0]), **_compared(name, args.trace)}
            except ValueError as error:  # JSONDecodeError included
                problem = f"printed no usable result ({error})"
        # Seen rarely on the 2-core machine: a gloo process aborting under load. Say so and run it
        # again rather than lose the whole table.
        print(f"  {name} {problem} (attempt {attempt}); last output:\n{done.stderr[-1500:]}")
    raise SystemExit(f"{name} failed twice")


def _compared(name: str, folder: str) -> dict:
    """The run's plan against its runtime trace, per stage (``show --measured``), while the next
    repetition has not overwritten them."""
    plan, trace = Path(folder or ".") / f"{name}.plan.json", Path(folder or ".") / f"{name}.trace.json"
    if not folder or not (plan.exists() and trace.exists()):
        return {}
    from lightning_rannc.plan.plan import PartitionPlan
    from lightning_rannc.report.compare import compare_with_trace, comparison_text

    comparison = compare_with_trace(PartitionPlan.load(plan), trace)
    return {
        "comparison": comparison_text(comparison, str(trace)),
        "traced_step_ms": comparison.measured_step_ms,
        "replayed_step_ms": comparison.replayed_step_ms,
    }


def _result(stdout: str, devices: int) -> dict:
    """Rank 0's result, with the memory of each of the ``devices`` ranks."""
    results = _records(stdout, "RESULT ")
    memory = sorted(_records(stdout, "MEMORY "), key=lambda entry: entry["rank"])
    ranks = [entry["rank"] for entry in memory]
    if len(results) != 1 or ranks != list(range(devices)):
        raise ValueError(f"{len(results)} RESULT line(s) and MEMORY lines from ranks {ranks}, of {devices} rank(s)")
    return {**results[0], "memory": [entry["memory"] for entry in memory]}


def _records(stdout: str, tag: str) -> list[dict]:
    """Every JSON object printed after ``tag``, wherever another rank's output cut in."""
    decoder = json.JSONDecoder()
    return [decoder.raw_decode(stdout, found.end())[0] for found in re.finditer(re.escape(tag), stdout)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", choices=list(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256, help="vocabulary (the tied embedding and head)")
    parser.add_argument("--only", default="", help="comma-separated runs (lightning_1proc is always run)")
    parser.add_argument(
        "--memory-limit",
        default="",
        help="memory_limit of every rannc run (e.g. 40MB); prints the automatic plan against the best forced one",
    )
    parser.add_argument(
        "--plan-once",
        default="",
        metavar="DIR",
        help="plan each rannc run at its first repetition and reuse the plan after (files in DIR, which must exist)",
    )
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="run every process with glibc's malloc keeping freed memory (MALLOC_MMAP_THRESHOLD_ and friends)",
    )
    parser.add_argument(
        "--trace",
        default="",
        metavar="DIR",
        help="trace every step of each rannc run (files in DIR, which must exist) and print its stages' "
        "predicted and measured forward and backward",
    )
    args = parser.parse_args()
    if args.run:
        _train(args)
        return
    print(
        f"GPT layers={args.layers} dim={args.dim} seq={args.seq} vocab={args.vocab}, "
        f"batch {args.batch_size} per pipeline/process"
    )
    repetitions: list[dict[str, dict]] = []
    for repetition in range(args.repeat):
        chosen = {"lightning_1proc", *filter(None, args.only.split(","))} if args.only else set(RUNS)
        if chosen - set(RUNS):
            parser.error(f"unknown run(s) {sorted(chosen - set(RUNS))}; valid: {list(RUNS)}")
        results = {name: _launch(name, args) for name in RUNS if name in chosen}
        print(f"repetition {repetition + 1}:")
        _print_results(results)
        if args.memory_limit:
            _print_memory_bound(results, args.memory_limit)
        repetitions.append(results)
    if len(repetitions) > 1:
        _print_medians(repetitions)
        if args.memory_limit:
            _print_memory_bound_medians(repetitions)


def _print_results(results: dict[str, dict]) -> None:
    base = results["lightning_1proc"]["samples_per_s"]
    for name, result in results.items():
        if "does_not_fit" in result:
            print(f"  {name:20s} does not fit: {result['does_not_fit']}")
            continue
        ratio = result["samples_per_s"] / base
        memory = ", ".join(f"params {p / 2**20:.2f} MiB + optimizer {o / 2**20:.2f} MiB" for p, o in result["memory"])
        print(f"  {name:20s} {result['samples_per_s']:8.1f} samples/s  {ratio:4.2f}x  per rank: {memory}")
        if "predicted_ms" in result:
            predicted = ", ".join(f"{(p + o) / 2**20:.2f} MiB" for p, o in result["predicted_memory"])
            print(
                f"  {'':20s} {result['layout']}: step {result['ms']:.1f} ms measured, "
                f"{result['predicted_ms']:.1f} ms predicted ({result['predicted_ms'] / result['ms']:.2f}x); "
                "predicted params + optimizer per stage: " + predicted
            )
        if "comparison" in result:
            print("\n".join(f"  {'':20s} {line}" for line in result["comparison"].splitlines()))
            # what the cpu preset's step_overhead_ms has to cover beyond the trace's collectives
            print(
                f"  {'':20s} Lightning's loop between steps: {result['ms'] - result['traced_step_ms']:.1f} ms "
                "(the measured step less the trace's median step)"
            )


def _print_medians(repetitions: list[dict[str, dict]]) -> None:
    """Each run's median ratio over the repetitions: to one process and to DDP of the same
    repetition (the machine's load drifts between repetitions more than within one)."""
    print(f"median over {len(repetitions)} repetitions:")
    for name in repetitions[0]:
        ran = [results for results in repetitions if "samples_per_s" in results[name]]
        if not ran:
            continue  # a forced layout over the memory limit
        line = f"  {name:20s} {_median_ratio(ran, name, 'lightning_1proc'):4.2f}x of one process"
        if name not in ("ddp_2proc", "lightning_1proc") and all("ddp_2proc" in results for results in ran):
            line += f", {_median_ratio(ran, name, 'ddp_2proc'):4.2f}x of DDP"
        if all("predicted_ms" in results[name] for results in ran):  # the cost model's error, less the noise
            accuracy = statistics.median(results[name]["predicted_ms"] / results[name]["ms"] for results in ran)
            line += f"; predicted/measured step {accuracy:.2f}"
        if all("replayed_step_ms" in results[name] for results in ran):  # the schedule model's share of it
            replayed = statistics.median(
                results[name]["replayed_step_ms"] / results[name]["traced_step_ms"] for results in ran
            )
            line += f"; replayed from the measured actions/traced step {replayed:.2f}"
        print(line)


def _median_ratio(repetitions: list[dict[str, dict]], name: str, base: str) -> float:
    return statistics.median(r[name]["samples_per_s"] / r[base]["samples_per_s"] for r in repetitions)


def _print_memory_bound_medians(repetitions: list[dict[str, dict]]) -> None:
    """The automatic plan's median (of one process) against the best forced layout's median:
    one repetition's best forced layout is the fastest of several noisy runs, which a single
    run of the automatic plan is compared with at a disadvantage."""
    medians = {
        name: _median_ratio(repetitions, name, "lightning_1proc")
        for name in repetitions[0]
        if name.startswith("rannc_") and all("samples_per_s" in results[name] for results in repetitions)
    }
    forced = {name: ratio for name, ratio in medians.items() if name != "rannc_auto"}
    if "rannc_auto" not in medians or not forced:
        print("  no median comparison: the automatic plan or every forced layout did not run every repetition")
        return
    best = max(forced, key=forced.__getitem__)
    print(
        f"  automatic plan (median {medians['rannc_auto']:.2f}x of one process): "
        f"{medians['rannc_auto'] / forced[best]:.2f}x of the best forced layout's median ({best}, {forced[best]:.2f}x)"
    )


def _print_memory_bound(results: dict[str, dict], limit: str) -> None:
    """The automatic plan against the fastest hand-forced layout that fits the same limit."""
    ddp_like = results.get("rannc_s1_d2_zero0")  # DDP's layout, under the planner's memory model
    if ddp_like is not None:  # plain DDP has no limit to obey; the same layout forced does
        verdict = "does not fit" if "does_not_fit" in ddp_like else "fits"
        print(f"  DDP's layout (1 stage x 2 replicas, whole optimizer state each, 1 micro-batch) {verdict} {limit}")
    forced = {
        name: result["samples_per_s"]
        for name, result in results.items()
        if name.startswith("rannc_") and name != "rannc_auto" and "does_not_fit" not in result
    }
    if "rannc_auto" not in results or "does_not_fit" in results["rannc_auto"] or not forced:
        print("  no comparison: the automatic plan or every forced layout did not run")
        return
    best = max(forced, key=forced.__getitem__)
    auto = results["rannc_auto"]["samples_per_s"]
    print(f"  automatic plan: {auto / forced[best]:.2f}x of the best forced layout that fits ({best})")


if __name__ == "__main__":
    main()
