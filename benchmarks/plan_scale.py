"""How long planning takes at the planner's scale targets, phase by phase, on CPU alone.

For each target the model is built on the meta device (no memory), its training step is
captured on fake tensors with a micro-batch of one sample, the blocks are grouped, their costs
estimated from FLOPs (``lightning_rannc.profile.analytic``), and the graph summaries the planner
reads (cut sizes, fingerprint, tensor names) computed. Nothing runs and nothing is allocated.

Targets (the planner issue's): a BERT-style model of ~77B parameters (96 layers, hidden 8192,
64 heads, sequence 512) on 256 devices of 80 GB in under 60 s end to end, and a GPT-3-shaped
model of ~175B (96 layers, hidden 12288, 96 heads, sequence 2048) on 1024 devices in under 60 s,
in fp32 and in bf16-mixed, twice: the project's own GPT (``gpt-175b``) and transformers'
``GPT2LMHeadModel`` in that shape (``hf-gpt-175b``, a model nobody here wrote).

    python benchmarks/plan_scale.py                      # the three targets
    python benchmarks/plan_scale.py --only bert-77b --layers 12   # a shallower variant
    python benchmarks/plan_scale.py --repeat 3           # median of 3 runs per phase (shared CPUs are noisy)
    python benchmarks/plan_scale.py --profile gpt-175b   # cProfile of the phases, top 30
    python benchmarks/plan_scale.py --only gpt-175b --precision 32-true --precision bf16-mixed

The search plans for the target's devices (8 per node, 80 GB, AdamW) and a global batch of
2048 (BERT) or 1536 (GPT-3's) sequences, with the strategy's default options (micro-batch count
chosen by the planner; ``--precision``: the Trainer's precision, fp32 by default).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]  # run from anywhere, installed or not

from lightning_rannc.capture.batch import flatten_batch  # noqa: E402
from lightning_rannc.capture.export import capture_training_step  # noqa: E402
from lightning_rannc.capture.graph import StepGraph, group_nodes  # noqa: E402
from lightning_rannc.capture.module_state import fake_module_state  # noqa: E402
from lightning_rannc.dry_run import PRECISIONS  # noqa: E402
from lightning_rannc.errors import PlanError  # noqa: E402
from lightning_rannc.plan.devices import get_device  # noqa: E402
from lightning_rannc.plan.report import format_plan  # noqa: E402
from lightning_rannc.plan.search import SearchSettings, search_plan  # noqa: E402
from lightning_rannc.profile.analytic import estimate_blocks  # noqa: E402
from lightning_rannc.profile.tensors import tensor_table  # noqa: E402

from models import GPTLM, HFGPT2LM, BertLM, count_parameters  # noqa: E402

GB = 10**9


@dataclass
class Target:
    name: str
    model: Callable[..., Any]
    kwargs: dict[str, Any]
    devices: int
    device_memory: int
    budget_s: float
    global_batch: int
    """Sequences per optimizer step (GPT-3 175B trained with 1536 of 2048 tokens)."""


TARGETS = {
    "bert-77b": Target(
        "bert-77b", BertLM, dict(layers=96, hidden=8192, heads=64, seq_len=512), 256, 80 * GB, 60.0, 2048
    ),
    "gpt-175b": Target(
        "gpt-175b",
        GPTLM,
        dict(layers=96, hidden=12288, heads=96, seq_len=2048, vocab=50257),
        1024,
        80 * GB,
        60.0,
        1536,
    ),
    # GPT-3's shape in transformers' GPT2LMHeadModel: a model nobody here wrote.
    "hf-gpt-175b": Target(
        "hf-gpt-175b",
        HFGPT2LM,
        dict(layers=96, hidden=12288, heads=96, seq_len=2048, vocab=50257),
        1024,
        80 * GB,
        60.0,
        1536,
    ),
    # Small shapes for quick checks (not run by default).
    "bert-base": Target("bert-base", BertLM, {}, 8, 80 * GB, 60.0, 256),
    "gpt2-small": Target("gpt2-small", GPTLM, {}, 8, 80 * GB, 60.0, 256),
}
DEFAULT_TARGETS = ("bert-77b", "gpt-175b", "hf-gpt-175b")


def search(graph: StepGraph, costs: list, *, target: Target, device_spec: Any, microbatch_size: int) -> Any:
    """The planner's search over every layout of ``target.devices`` devices (8 per node)."""
    settings = SearchSettings(
        num_devices=target.devices,
        global_batch_size=target.global_batch,
        device=device_spec,
        devices_per_node=8,
        memory_limit=target.device_memory,
        optimizer="adamw",
    )
    return search_plan(
        costs,
        reference_microbatch_size=microbatch_size,
        settings=settings,
        tensors=tensor_table(graph.tensors),
        graph_fingerprint=graph.fingerprint(),
    )


@dataclass
class Timings:
    phases: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

    @property
    def total(self) -> float:
        return sum(self.phases.values())


def plan(
    target: Target, max_blocks: int = 128, device: str | None = "h100", precision: str = "32-true", **overrides: Any
) -> tuple[Timings, dict[str, Any]]:
    """Plan ``target`` (its model kwargs updated with the non-None ``overrides``), timing each phase.

    ``device`` names the preset the costs are estimated for, when ``estimate_blocks`` takes one;
    ``precision`` the Trainer's (mixed: captured and costed under autocast; true: converted).
    """
    autocast, dtype = PRECISIONS[precision]
    kwargs = dict(target.kwargs, **{k: v for k, v in overrides.items() if v is not None})
    device_spec = get_device(device or "h100")
    t = Timings()
    with t.phase("build on meta"):
        with torch.device("meta"):
            model = target.model(**kwargs)
        model.log = lambda *a, **k: None  # no Trainer: `self.log` would complain
        if dtype is not None:
            model = model.to(dtype)
        batch = next(iter(model.train_dataloader()))
        one = {k: v[:1] for k, v in batch.items()}  # a micro-batch of one sample
    with ExitStack() as stack:  # the module's tensors are fake until the costs are estimated
        if autocast is not None:
            stack.enter_context(torch.autocast("cpu", dtype=autocast))
        with t.phase("capture (export)"):
            mode = stack.enter_context(fake_module_state(model, torch.device("cpu")))
            leaves, spec = flatten_batch(one, "benchmark")
            fake_leaves = [mode.from_tensor(leaf) for leaf in leaves]
            captured = capture_training_step(model, spec.unflatten(fake_leaves))
        with t.phase("step graph"):
            graph = StepGraph.from_captured(captured)
        with t.phase("group blocks"):
            spans = group_nodes(graph, max_blocks)
        with t.phase("estimate costs"):
            costs = estimate_blocks(graph, fake_leaves, spans, device=device_spec)
    with t.phase("graph summaries"):
        cut = graph.cut_bytes()
        fingerprint = graph.fingerprint()
        names = [graph.tensor_names(a, b) for a, b in spans]
        graph.node_keys()
    with t.phase("search"):
        try:
            result: Any = search(graph, costs, target=target, device_spec=device_spec, microbatch_size=1)
        except PlanError as refusal:  # an answer too: it names what would fit
            result = refusal
    info = dict(
        params=count_parameters(model),
        nodes=len(graph),
        blocks=len(spans),
        fingerprint=fingerprint,
        max_cut=max(cut),
        tensors=sum(len(n) for n in names),
        fwd_ms=sum(c.fwd_ms for c in costs),
        bwd_ms=sum(c.bwd_ms for c in costs),
        activation_gb=sum(c.activation_bytes for c in costs) / GB,
        plan=result,
    )
    assert all(p.is_meta for p in model.parameters())
    return t, info


def _median(runs: list[Timings]) -> Timings:
    """Per-phase medians of several runs (the total is their sum)."""
    return Timings({p: statistics.median(r.phases[p] for r in runs) for p in runs[0].phases})


def _table(rows: list[tuple[str, Timings, dict[str, Any], Target]]) -> None:
    phases = list(rows[0][1].phases)
    width = max(len(p) for p in [*phases, "est. fwd+bwd / sample"]) + 2
    header = "".join(f"{name:>22s}" for name, *_ in rows)
    print(f"\n{'phase':<{width}}{header}")
    for p in phases:
        print(f"{p:<{width}}" + "".join(f"{t.phases[p]:>21.2f}s" for _, t, _, _ in rows))
    print(f"{'total':<{width}}" + "".join(f"{t.total:>21.2f}s" for _, t, _, _ in rows))
    print(f"{'budget':<{width}}" + "".join(f"{tg.budget_s:>21.0f}s" for *_, tg in rows))
    print()
    facts = {
        "parameters": lambda i, tg: f"{i['params'] / 1e9:.1f}B",
        "graph nodes": lambda i, tg: str(i["nodes"]),
        "blocks": lambda i, tg: str(i["blocks"]),
        "devices": lambda i, tg: str(tg.devices),
        "est. fwd+bwd / sample": lambda i, tg: f"{(i['fwd_ms'] + i['bwd_ms']) / 1e3:.2f}s",
        "activations / sample": lambda i, tg: f"{i['activation_gb']:.1f}GB",
    }
    for label, fact in facts.items():
        print(f"{label:<{width}}" + "".join(f"{fact(info, tg):>22s}" for _, _, info, tg in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(TARGETS), action="append", help="run this target (repeatable)")
    parser.add_argument("--layers", type=int, help="override the number of layers (e.g. 12 to compare)")
    parser.add_argument("--attention", choices=("matmul", "sdpa"), help="attention implementation of the models")
    parser.add_argument("--max-blocks", type=int, default=128)
    parser.add_argument("--device", default="h100", help="device preset for the cost model (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per target; phases report the median")
    parser.add_argument("--profile", choices=sorted(TARGETS), help="cProfile one target, print the top 30")
    parser.add_argument(
        "--precision", choices=list(PRECISIONS), action="append", help="the Trainer's precision (repeatable; 32-true)"
    )
    args = parser.parse_args()
    options = dict(layers=args.layers, attention=args.attention)

    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        plan(TARGETS[args.profile], args.max_blocks, args.device, **options)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return

    rows = []
    precisions = args.precision or ["32-true"]
    for name in args.only or DEFAULT_TARGETS:
        target = TARGETS[name]
        for precision in precisions:
            runs, info = [], {}
            for _ in range(max(1, args.repeat)):
                timings, info = plan(target, args.max_blocks, args.device, precision, **options)
                runs.append(timings)
            label = name if not args.layers else f"{name}/{args.layers}L"
            label += f" {precision}" if len(precisions) > 1 else ""
            rows.append((label, _median(runs), info, target))
    _table(rows)
    for label, timings, info, target in rows:
        verdict = "within" if timings.total <= target.budget_s else "OVER"
        print(f"{label}: {timings.total:.1f}s end to end, {verdict} the {target.budget_s:.0f}s budget")
        if isinstance(info["plan"], PlanError):
            print(f"  refused: {info['plan']}")
            continue
        text = format_plan(info["plan"].plan).splitlines()
        wanted = ("predicted step", "pipeline bubble", "techniques")
        print("\n".join(["  " + line for line in [text[0], *(t for t in text if t.startswith(wanted))]]))


if __name__ == "__main__":
    main()
