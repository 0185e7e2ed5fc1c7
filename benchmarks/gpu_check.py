"""One-GPU check of RaNNCStrategy against plain Lightning: numbers, memory, overhead, host syncs, trace.

Meant to be run once, in a few minutes, on a machine with one NVIDIA GPU (an H100). NCCL refuses
two ranks on one GPU, so every run is one process (``devices=1``): ``pipeline_stages=1``, and
``virtual_stages=2`` for the multi-stage code on one rank (two stages, no point-to-point). Each
run trains the example GPT (``examples/gpt.py``, nothing to download) from the same seed on the
same batches, once with ``strategy="auto"`` and once with the strategy, and compares:

- per-step losses in fp32 (``pipeline_stages=1`` with its default micro-batches, and with
  ``virtual_stages=2``): max relative difference at most 1e-5;
- per-step losses in bf16-mixed and 16-mixed with a fused AdamW (on CPU: not fused; 16-mixed
  runs only where Lightning accepts it). Autocast rounds differently per micro-batch shape, so
  the goal is a loose 1e-2: it catches a wrong loss scale or a skipped step, not rounding;
- ``torch.cuda.max_memory_allocated()`` over the steps after warm-up against the plan's
  predicted total for the rank (``PartitionPlan.stages[i].memory["total"]``): within 10%;
- median time per step after warm-up, with ``micro_batches=1`` so that both runs do the same
  work and the difference is the runtime's own: at most 5% slower than plain Lightning;
- host syncs per step (``torch.cuda.set_sync_debug_mode("warn")``, warnings counted) in fp32 and
  16-mixed: no more than plain Lightning's;
- ``RaNNCStrategy(trace=..., trace_steps=N)``: the file parses as JSON (Chrome trace format) and
  has forward and backward events for each of the N steps.

On CPU (``--device cpu``) it is a smoke test of the script itself with a tiny GPT: the memory,
sync and timing checks print "n/a on cpu" (no CUDA allocator or syncs, and a tiny model on two
shared cores times Python, not the runtime) and do not count. Prints one table; exits 1 if a
check that ran missed its goal.

    python benchmarks/gpu_check.py                        # CUDA, a ~110M-parameter GPT
    python benchmarks/gpu_check.py --device cpu           # smoke test, well under a minute
    python benchmarks/gpu_check.py --steps 30 --out check.json   # and the raw numbers as JSON
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

import lightning_rannc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from gpt import GPT, make_dataloader  # noqa: E402

# (model arguments, batch size): on CUDA large enough that a step is GPU time, not Python time
MODELS = {
    "cuda": ({"vocab_size": 8192, "dim": 1024, "layers": 8, "heads": 16, "seq_len": 512}, 16),
    "cpu": ({"vocab_size": 256, "dim": 64, "layers": 2, "heads": 4, "seq_len": 32}, 8),
}
DEFAULT_STEPS = {"cuda": 20, "cpu": 8}
WARMUP = 3  # the strategy's first step captures, profiles and plans: never timed or measured
COUNTED = 3  # last steps of each CUDA run, run under the sync debug mode (and not timed)
TRACE_STEPS = 3
FP32_GOAL = 1e-5
MIXED_GOAL = 1e-2
MEMORY_GOAL = 0.10
OVERHEAD_GOAL = 0.05
# pytorch_lightning too: Lightning's rank-zero helpers log through whichever of the two was imported last
QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric", "lightning_rannc")
# Environment variables a strategy run sets; left behind, the next Trainer would inherit them.
RUN_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")


class FusedAdamGPT(GPT):
    """The example GPT with a fused AdamW: one kernel for the whole update, the usual choice on GPUs
    (and, with 16-mixed, one that unscales the gradients itself, inside ``step``)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01, fused=True)


@dataclass
class Run:
    """One training run: the strategy's options (``None``: plain Lightning) and its precision."""

    strategy: dict[str, Any] | None
    precision: str = "32-true"
    fused: bool = False
    steps: int | None = None
    """``None``: ``--steps``."""


@dataclass
class Result:
    """What one run measured (the raw numbers ``--out`` writes)."""

    losses: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    predicted_bytes: int | None = None
    syncs: int | None = None
    sync_steps: int = 0
    sync_sites: dict[str, int] = field(default_factory=dict)
    plan: list[str] = field(default_factory=list)
    error: str | None = None
    skipped: str | None = None


def runs(device: str, trace: Path) -> dict[str, Run]:
    fused = device == "cuda"  # the brief for CPU: torch's default AdamW there
    return {
        "plain_fp32": Run(None),
        "rannc_s1_fp32": Run({"pipeline_stages": 1}),
        # one micro-batch: the same work as plain Lightning, so the time difference is the runtime's
        "rannc_s1_m1_fp32": Run({"pipeline_stages": 1, "micro_batches": 1}),
        "rannc_s1_v2_fp32": Run({"pipeline_stages": 1, "virtual_stages": 2}),
        "plain_bf16": Run(None, "bf16-mixed", fused),
        "rannc_s1_bf16": Run({"pipeline_stages": 1}, "bf16-mixed", fused),
        "plain_fp16": Run(None, "16-mixed", fused),
        "rannc_s1_fp16": Run({"pipeline_stages": 1}, "16-mixed", fused),
        "rannc_s1_trace": Run(
            {"pipeline_stages": 1, "trace": str(trace), "trace_steps": TRACE_STEPS}, steps=TRACE_STEPS
        ),
    }


class Probe(L.Callback):
    """Per step: the loss (kept on the device until the end: reading it would sync); after warm-up
    the wall time of the step and the peak memory; in the last ``counted`` steps, no timing but the
    host syncs the sync debug mode reports."""

    def __init__(self, cuda: bool, steps: int, counted: int) -> None:
        self.cuda, self.steps, self.counted = cuda, steps, counted
        self.step = 0
        self.losses: list[torch.Tensor] = []
        self.step_ms: list[float] = []
        self.peak: int | None = None
        self.caught: list[warnings.WarningMessage] | None = None
        self._catcher: warnings.catch_warnings | None = None
        self._start = 0.0

    def _phase(self) -> str:
        if self.step < WARMUP:
            return "warmup"
        return "counted" if self.step >= self.steps - self.counted else "timed"

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, idx: int) -> None:
        phase = self._phase()
        if phase == "timed":
            self._synchronize()  # the step starts with nothing of the previous one still queued
            self._start = time.perf_counter()
        elif phase == "counted" and self._catcher is None:
            self._catcher = warnings.catch_warnings(record=True)
            self.caught = self._catcher.__enter__()
            warnings.simplefilter("always")  # the same call site syncing every step counts every time
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        phase = self._phase()
        self.losses.append(outputs["loss"].detach())
        if phase == "timed":
            self._synchronize()
            self.step_ms.append((time.perf_counter() - self._start) * 1e3)
        if phase != "warmup" and self.cuda:  # host-side allocator statistics: no sync
            # read here, not after fit: at the end of training the strategy gathers the module again
            self.peak = torch.cuda.max_memory_allocated()
        self.step += 1
        if self.step == WARMUP and self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()  # from here on: training only, no profiling or planning
        if self.step == self.steps:
            self.stop_counting()

    def stop_counting(self) -> None:
        """Leave the sync debug mode (also after a failed step: the next run must not inherit it)."""
        if self._catcher is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._catcher.__exit__(None, None, None)
        self._catcher = None

    def _synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def train(name: str, run: Run, device: str, default_steps: int) -> Result:
    """One run from seed 0; a failure is recorded (and printed), not raised, so the table still shows
    every other check."""
    model_args, batch_size = MODELS[device]
    steps = run.steps or default_steps
    counted = COUNTED if device == "cuda" and steps > WARMUP + COUNTED else 0
    probe = Probe(device == "cuda", steps, counted)
    result = Result()
    saved_env = {key: os.environ.get(key) for key in RUN_ENV}
    L.seed_everything(0, verbose=False)
    model = (FusedAdamGPT if run.fused else GPT)(**model_args)
    loader = make_dataloader(batch_size, model_args["seq_len"], model_args["vocab_size"], size=batch_size * steps)
    trainer: L.Trainer | None = None
    try:
        strategy: Any = "auto" if run.strategy is None else lightning_rannc.RaNNCStrategy(**run.strategy)
        trainer = L.Trainer(
            accelerator=device,
            devices=1,
            strategy=strategy,
            precision=run.precision,  # type: ignore[arg-type]
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            callbacks=[probe],
        )
        if str(trainer.precision) != run.precision:  # Lightning swaps 16-mixed for bf16-mixed on CPU
            result.skipped = f"Lightning runs {run.precision} as {trainer.precision} on {device}"
            return result
        trainer.fit(model, loader)
    except Exception as error:  # any failure is a result of the check
        result.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        print(f"{name} failed:\n{traceback.format_exc()}", file=sys.stderr)
    finally:
        probe.stop_counting()
        if torch.distributed.is_initialized():  # the next run's Trainer starts its own process group
            torch.distributed.destroy_process_group()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    result.losses = [float(loss) for loss in probe.losses]
    result.step_ms = probe.step_ms
    result.peak_bytes = probe.peak
    plan = getattr(trainer.strategy, "plan", None) if trainer is not None else None
    if plan is not None:
        result.plan = plan.summary()
        stages = plan.stages_of_rank(0)
        if all("total" in stage.memory for stage in stages):
            result.predicted_bytes = sum(stage.memory["total"] for stage in stages)
    if probe.caught is not None:
        syncs = [w for w in probe.caught if "synchroniz" in str(w.message)]
        result.syncs, result.sync_steps = len(syncs), counted
        for w in syncs:
            site = f"{w.filename}:{w.lineno}"
            result.sync_sites[site] = result.sync_sites.get(site, 0) + 1
    del trainer, model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


# --- the checks: (result, goal, verdict) from the runs -------------------------------------------


def max_relative_difference(ours: list[float], reference: list[float]) -> float:
    if not ours or len(ours) != len(reference) or not all(map(math.isfinite, ours + reference)):
        return math.inf
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, reference))


def _unusable(results: tuple[Result, ...], cuda: bool) -> tuple[str, str] | None:
    """(result text, verdict) when one of ``results`` gives no numbers: an error fails the check; a
    precision Lightning does not run on CPU makes it n/a (on CUDA, a fail)."""
    for result in results:
        if result.error:  # the whole message is in --out and on stderr
            text = f"error: {result.error}"
            return text if len(text) <= 100 else text[:97] + "...", "FAIL"
        if result.skipped:
            return result.skipped, "FAIL" if cuda else "n/a on cpu"
    return None


def losses_check(ours: Result, reference: Result, goal: float, cuda: bool, note: str = "") -> tuple[str, str, str]:
    goal_text = f"<= {goal:.0e}" + (" (loose: mixed precision)" if goal > FP32_GOAL else "")
    unusable = _unusable((reference, ours), cuda)
    if not cuda and "needs torch 2.13 or later on the gloo backend" in (ours.error or ""):
        return "one rank's virtual stages need torch >= 2.13 on gloo (refused)", goal_text, "n/a on cpu"
    if unusable:
        return unusable[0], goal_text, unusable[1]
    difference = max_relative_difference(ours.losses, reference.losses)
    text = f"max rel diff {difference:.2e} over {len(ours.losses)} steps{note}"
    return text, goal_text, "pass" if difference <= goal else "FAIL"


def memory_check(ours: Result, plain: Result, cuda: bool) -> tuple[str, str, str]:
    goal = f"measured/predicted within 1 +- {MEMORY_GOAL:.2f}"
    unusable = _unusable((ours,), cuda)
    if unusable:
        return unusable[0], goal, unusable[1]
    predicted = f"{ours.predicted_bytes / 2**20:.1f} MiB" if ours.predicted_bytes else "none in the plan"
    if not cuda:
        return f"predicted {predicted}", goal, "n/a on cpu"
    if not ours.predicted_bytes or ours.peak_bytes is None:
        return f"predicted {predicted}, measured {ours.peak_bytes}", goal, "FAIL"
    ratio = ours.peak_bytes / ours.predicted_bytes
    plain_peak = f" (plain {plain.peak_bytes / 2**20:.1f})" if plain.peak_bytes else ""
    text = f"measured {ours.peak_bytes / 2**20:.1f} MiB{plain_peak}, predicted {predicted}, ratio {ratio:.3f}"
    return text, goal, "pass" if abs(ratio - 1) <= MEMORY_GOAL else "FAIL"


def overhead_check(ours: Result, plain: Result, cuda: bool) -> tuple[str, str, str]:
    goal = f"<= +{OVERHEAD_GOAL:.0%} (micro_batches=1)"
    unusable = _unusable((plain, ours), cuda)
    if unusable:
        return unusable[0], goal, unusable[1]
    if not ours.step_ms or not plain.step_ms:
        return "no timed steps (raise --steps)", goal, "FAIL"
    mine, theirs = statistics.median(ours.step_ms), statistics.median(plain.step_ms)
    overhead = mine / theirs - 1
    text = f"rannc {mine:.2f} ms, plain {theirs:.2f} ms ({overhead:+.1%})"
    if not cuda:  # a tiny model on two shared cores: the number is shown, but it times Python
        return text, goal, "n/a on cpu"
    return text, goal, "pass" if overhead <= OVERHEAD_GOAL else "FAIL"


def syncs_check(ours: Result, plain: Result, cuda: bool) -> tuple[str, str, str]:
    goal = "per step <= plain Lightning's"
    if not cuda:
        return "-", goal, "n/a on cpu"
    unusable = _unusable((plain, ours), cuda)
    if unusable:
        return unusable[0], goal, unusable[1]
    if ours.syncs is None or plain.syncs is None:
        return "not counted (raise --steps)", goal, "FAIL"
    mine, theirs = ours.syncs / ours.sync_steps, plain.syncs / plain.sync_steps
    text = f"rannc {mine:.1f}, plain {theirs:.1f} (over {ours.sync_steps} steps)"
    return text, goal, "pass" if mine <= theirs else "FAIL"


def trace_check(result: Result, path: Path, cuda: bool) -> tuple[str, str, str]:
    goal = f"JSON; F and B events in each of {TRACE_STEPS} steps"
    unusable = _unusable((result,), cuda)
    if unusable:
        return unusable[0], goal, unusable[1]
    try:
        events = json.loads(path.read_text())["traceEvents"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable: {type(error).__name__}: {error}", goal, "FAIL"
    boxes = [e for e in events if isinstance(e, dict) and e.get("ph") == "X"]
    kinds = {(e.get("args", {}).get("step"), e.get("cat")) for e in boxes}
    complete = all((step, kind) in kinds for step in range(1, TRACE_STEPS + 1) for kind in ("forward", "backward"))
    text = f"{len(events)} events ({len(boxes)} timed), valid JSON"
    return text, goal, "pass" if complete else "FAIL"


def checks(results: dict[str, Result], cuda: bool, trace: Path) -> list[tuple[str, str, str, str]]:
    r = results
    note = "" if cuda else " (AdamW not fused on cpu)"
    rows = {
        "losses fp32 s1": losses_check(r["rannc_s1_fp32"], r["plain_fp32"], FP32_GOAL, cuda),
        "losses fp32 s1 v2": losses_check(r["rannc_s1_v2_fp32"], r["plain_fp32"], FP32_GOAL, cuda),
        "losses bf16-mixed fused": losses_check(r["rannc_s1_bf16"], r["plain_bf16"], MIXED_GOAL, cuda, note),
        "losses 16-mixed fused": losses_check(r["rannc_s1_fp16"], r["plain_fp16"], MIXED_GOAL, cuda, note),
        "peak memory vs plan": memory_check(r["rannc_s1_fp32"], r["plain_fp32"], cuda),
        "step time overhead": overhead_check(r["rannc_s1_m1_fp32"], r["plain_fp32"], cuda),
        "host syncs fp32": syncs_check(r["rannc_s1_fp32"], r["plain_fp32"], cuda),
        "host syncs 16-mixed": syncs_check(r["rannc_s1_fp16"], r["plain_fp16"], cuda),
        "runtime trace": trace_check(r["rannc_s1_trace"], trace, cuda),
    }
    return [(name, *row) for name, row in rows.items()]


def table(rows: list[tuple[str, str, str, str]]) -> str:
    header = ("check", "result", "goal", "verdict")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, help=f"training steps per run (default: {DEFAULT_STEPS})")
    parser.add_argument("--out", type=Path, help="write the table and the raw numbers as JSON (and the trace beside)")
    parser.add_argument("--verbose", action="store_true", help="keep Lightning's and the strategy's log lines")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device (use --device cpu for the smoke test)")
    steps = args.steps or DEFAULT_STEPS[args.device]
    if steps < WARMUP + (COUNTED if cuda else 0) + 2:
        parser.error(f"--steps must leave at least 2 timed steps after {WARMUP} of warm-up")
    if not args.verbose:  # the table is the output; the plans go to --out
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
    if not cuda:
        # tiny ops on a small, shared machine: more threads only contend (as in throughput.py)
        torch.set_num_threads(1)
    # Lightning's launcher (the strategy's, as DDP's) sets the thread count unless OMP_NUM_THREADS is
    # set: pinned here, plain Lightning before the first strategy run gets the same count as after it
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    if cuda:
        # full fp32 matmuls (no TF32) in both runs: the fp32 goal of 1e-5 is about the runtime, not TF32
        torch.set_float32_matmul_precision("highest")
    with tempfile.TemporaryDirectory() as folder:
        trace = args.out.with_suffix(".trace.json") if args.out else Path(folder) / "trace.json"
        started = time.perf_counter()
        results = {name: train(name, run, args.device, steps) for name, run in runs(args.device, trace).items()}
        rows = checks(results, cuda, trace)
    model_args, batch_size = MODELS[args.device]
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(
        f"{device}: GPT {model_args}, batch {batch_size}, {steps} steps per run, {time.perf_counter() - started:.0f} s"
    )
    print(table(rows))
    if args.out:
        record = {
            "device": device,
            "model": model_args,
            "batch_size": batch_size,
            "steps": steps,
            "checks": [dict(zip(("check", "result", "goal", "verdict"), row)) for row in rows],
            "runs": {name: {**vars(result)} for name, result in results.items()},
        }
        args.out.write_text(json.dumps(record, indent=2))
    sys.exit(1 if any(row[3] == "FAIL" for row in rows) else 0)


if __name__ == "__main__":
    main()
