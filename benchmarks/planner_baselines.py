"""Predicted step time of the planner's plan against the splits other pipeline libraries make.

For each model (GPT-like, BERT-like, ResNet-like, and a GPT with a deliberately huge output
head) and device count ``N``, the script captures the training step once on fake tensors (one
sample, nothing allocated), estimates the block costs analytically for a device preset
(``lightning_rannc.profile.analytic``), runs the planner's search (``search_plan``), and then
predicts, with the *same* cost, memory, schedule and gradient-exchange models
(``evaluate_split``), the step time of:

* even-layers: an even split by layer count (torchtitan / PiPPy's default): every stage gets
  ``floor`` or ``ceil`` of ``L / S`` of the repeated layers (the first stages take the extra
  ones), the embedding goes with the first stage and the head with the last. Each layer
  boundary is moved to the nearest block boundary (blocks are the only places any split of
  this graph can cut).
* by-params: DeepSpeed's ``partition_method="parameters"``: ``deepspeed.runtime.utils.
  partition_balanced`` (ported: the dynamic program that minimises max - min of the per-stage
  parameter counts) over the per-block parameter counts; a tensor used by several blocks (tied
  embedding / head) counts in each, as a ``TiedLayerSpec`` does.
* by-time: torchgpipe's ``balance_by_time``: contiguous stages balancing the profiled
  forward + backward time per block, ignoring memory and communication. Solved exactly
  (min-max), i.e. at least as good as torchgpipe's own heuristic (``blockpartition.solve``).
* lower bound: fwd + bwd of every block for the whole global batch, over ``N`` devices (no
  bubble, no communication, no recomputation).

Each baseline is first evaluated on the stages x replicas x micro-batches (S x D x M) that the
planner chose, then (second table) on its own best layout: the same S x D x M candidates the
search looks at, each with that partitioner's split. A stage that does not fit in memory even
with activation checkpointing makes the split "OOM" (stages turn checkpointing on where memory
demands it, for every partitioner alike).

A last table, "where memory binds", caps each model's per-device memory at a fraction (40%) of
its one-device footprint, where plain data parallelism cannot fit, and predicts (a) the joint
search (ZeRO 0/1/2, interleaved 1F1B with V = 2..4, checkpointing per stage) against (b) the
search restricted to the axes the planner had before: S x D x M with ZeRO-1 and GPipe / 1F1B.

    python benchmarks/planner_baselines.py                       # the four models, N = 2 4 8 16 64
    python benchmarks/planner_baselines.py --only gpt skewed --devices 8 64 --splits
    python benchmarks/planner_baselines.py --no-memory-bound     # without the last table
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]  # run from anywhere, installed or not

from lightning_rannc._utils import where_defined  # noqa: E402
from lightning_rannc.capture.batch import flatten_batch  # noqa: E402
from lightning_rannc.capture.export import capture_training_step  # noqa: E402
from lightning_rannc.capture.graph import StepGraph, group_nodes  # noqa: E402
from lightning_rannc.capture.module_state import fake_module_state  # noqa: E402
from lightning_rannc.dry_run import optimizer_kind, sample_batch, tensor_table  # noqa: E402
from lightning_rannc.errors import PlanError  # noqa: E402
from lightning_rannc.plan.cost_model import BlockCost  # noqa: E402
from lightning_rannc.plan.devices import DeviceSpec, get_device  # noqa: E402
from lightning_rannc.plan.memory import TensorTable  # noqa: E402
from lightning_rannc.plan.plan import PartitionPlan  # noqa: E402
from lightning_rannc.plan.search import SearchResult, SearchSettings, evaluate_split, search_plan  # noqa: E402
from lightning_rannc.plan.solver import min_max_partition  # noqa: E402
from lightning_rannc.profile.analytic import estimate_blocks  # noqa: E402

from models import GPTLM, BertLM, count_parameters  # noqa: E402

BASELINES = ("even-layers", "by-params", "by-time")
DEVICES = [2, 4, 8, 16, 64]
MEMORY_BOUND_DEVICES = [8, 64]
"""Device counts of the memory-bound table unless ``--devices`` names others."""


# --------------------------------------------------------------------------------------------
# A ResNet-like model: bottleneck blocks in one flat ModuleList, so its "layers" are countable.
# --------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 reduce, 3x3 (strided), 1x1 expand, projection shortcut."""

    def __init__(self, cin: int, width: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class RandomImages(Dataset):
    def __init__(self, size: int, image_size: int, classes: int) -> None:
        self.size, self.image_size, self.classes = size, image_size, classes

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(index)
        image = torch.randn(3, self.image_size, self.image_size, generator=gen)
        return {"images": image, "labels": torch.randint(0, self.classes, (), generator=gen)}


class ResNetLike(L.LightningModule):
    """ResNet with bottleneck blocks (``depths`` per resolution, ResNet-101: 3-4-23-3), every
    channel count ``width`` times ResNet's; SGD with momentum."""

    def __init__(
        self,
        depths: Sequence[int] = (3, 4, 23, 3),
        width: int = 4,
        classes: int = 1000,
        image_size: int = 224,
        batch_size: int = 8,
        lr: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size, self.image_size, self.classes, self.lr = batch_size, image_size, classes, lr
        stem = 64 * width
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        blocks: list[nn.Module] = []
        cin = stem
        for level, depth in enumerate(depths):
            inner = 64 * width * 2**level
            for k in range(depth):
                blocks.append(Bottleneck(cin, inner, 4 * inner, 2 if (k == 0 and level > 0) else 1))
                cin = 4 * inner
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["images"]), batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomImages(self.batch_size, self.image_size, self.classes), batch_size=self.batch_size)


def GPTLMUntiedHead(**kwargs: Any) -> GPTLM:
    """``GPTLM`` whose output head has its own weight (not tied to the token embedding): the
    embedding then has as many parameters as the head but no FLOPs."""
    model = GPTLM(**kwargs)
    model.head.weight = nn.Parameter(torch.empty_like(model.tok_emb.weight))
    return model


@dataclass
class Case:
    label: str
    model: Callable[..., L.LightningModule]
    kwargs: dict[str, Any]
    global_batch: int


CASES = {
    "gpt": Case(
        "GPT-like: GPT-3 6.7B shape (32 x 4096, 32 heads), sequence 2048, fused attention, no dropout",
        GPTLM,
        dict(layers=32, hidden=4096, heads=32, seq_len=2048, vocab=50257, attention="sdpa", dropout=0.0, batch_size=1),
        128,
    ),
    "bert": Case(
        "BERT-like: Megatron-BERT 3.9B shape (48 x 2560, 40 heads), sequence 512",
        BertLM,
        dict(layers=48, hidden=2560, heads=40, seq_len=512, vocab=30522, batch_size=1),
        256,
    ),
    "resnet": Case(
        "ResNet-like: ResNet-101 layout (3-4-23-3 bottlenecks), 8x the channels, 224x224 images",
        ResNetLike,
        dict(depths=(3, 4, 23, 3), width=8, image_size=224, batch_size=1),
        512,
    ),
    "skewed": Case(
        "skewed: GPT 32 x 2560 with a 2^20-word vocabulary, untied embedding and head "
        "(each 2.7B parameters; the head ~half the FLOPs)",
        GPTLMUntiedHead,
        dict(layers=32, hidden=2560, heads=32, seq_len=1024, vocab=2**20, attention="sdpa", dropout=0.0, batch_size=1),
        128,
    ),
}


# --------------------------------------------------------------------------------------------
# Capture and block costs: the first half of lightning_rannc.dry_run.plan_module.
# --------------------------------------------------------------------------------------------


@dataclass
class Captured:
    blocks: list[BlockCost]
    tensors: TensorTable
    fingerprint: str
    params: int
    nodes: int
    layer_starts: list[int]
    """Node index where each repeated layer starts, in order."""
    layer_container: str


def capture(module: L.LightningModule, settings: SearchSettings, max_blocks: int) -> Captured:
    batch = sample_batch(module)
    leaves, spec = flatten_batch(batch, where_defined(module.training_step))
    with fake_module_state(module, torch.device("cpu")) as mode:
        sample = [mode.from_tensor(leaf[:1]) for leaf in leaves]
        captured = capture_training_step(module, spec.unflatten(sample))
        graph = StepGraph.from_captured(captured)
        spans = group_nodes(graph, max_blocks)
        try:
            costs = estimate_blocks(graph, sample, spans, device=settings.device)
        except TypeError as error:
            if "device" not in str(error):
                raise
            raise SystemExit(
                "lightning_rannc.profile.analytic.estimate_blocks() takes no `device=` yet (it is being "
                "added): the costs would not be for the device preset. Try again once it does."
            ) from error
        tensors = tensor_table(graph.tensors)
        container, starts = _layer_starts(graph)
        fingerprint = graph.fingerprint()
    return Captured(costs, tensors, fingerprint, count_parameters(module), len(graph), starts, container)


def _layer_starts(graph: StepGraph) -> tuple[str, list[int]]:
    """The repeated layers: the module container with the most distinct ``<container>.<index>``
    children (``blocks.7``, ``layers.12``), and the first node of each of its layers."""
    first: dict[str, dict[int, int]] = {}
    for node in range(len(graph)):
        parts = graph.module_path(node).split(".")
        k = next((k for k in range(1, len(parts)) if parts[k].isdigit()), None)
        if k is not None:
            first.setdefault(".".join(parts[:k]), {}).setdefault(int(parts[k]), node)
    if not first:
        return "", []
    container = max(first, key=lambda c: len(first[c]))
    starts = [node for _, node in sorted(first[container].items())]
    return container, starts


# --------------------------------------------------------------------------------------------
# The baselines' splits: block boundaries [0, b1, ..., B].
# --------------------------------------------------------------------------------------------


def even_layers_split(cap: Captured, stages: int) -> list[int] | None:
    """torchtitan / PiPPy: floor or ceil(L / S) layers per stage, the first stages take the extra
    ones; embedding with stage 0, head with the last. None if S > L."""
    layers = len(cap.layer_starts)
    if stages == 1:
        return [0, len(cap.blocks)]
    if stages > layers:
        return None
    per, extra = divmod(layers, stages)
    first_layer = [s * per + min(s, extra) for s in range(stages)]
    block_starts = [b.start for b in cap.blocks]
    bounds = [0]
    for s in range(1, stages):
        node = cap.layer_starts[first_layer[s]]
        nearest = min(range(1, len(block_starts)), key=lambda b: (abs(block_starts[b] - node), b))
        bounds.append(nearest)
    bounds.append(len(cap.blocks))
    return bounds if all(a < b for a, b in zip(bounds, bounds[1:])) else None


def deepspeed_partition_balanced(weights: Sequence[float], num_parts: int) -> list[int]:
    """``deepspeed.runtime.utils.partition_balanced`` (current DeepSpeed): a DP over contiguous
    parts minimising (heaviest part - lightest part); ``partition_uniform`` if ``n <= parts``."""
    n, m = len(weights), num_parts
    if n <= m:
        return [min(p, n) for p in range(m + 1)]
    inf = math.inf
    dp_max = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_min = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_cost = [[inf] * (m + 1) for _ in range(n + 1)]
    position = [[0] * (m + 1) for _ in range(n + 1)]
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    dp_max[0][0] = 0
    dp_cost[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            for k in range(i):
                part = prefix[i] - prefix[k]
                max_sum = max(dp_max[k][j - 1], part)
                min_sum = min(dp_min[k][j - 1], part)
                cost = max_sum - min_sum  # inf - inf = nan when k cannot hold j - 1 parts
                if cost == cost and dp_cost[i][j] >= cost:
                    dp_cost[i][j], dp_max[i][j], dp_min[i][j], position[i][j] = cost, max_sum, min_sum, k
    parts = [n]
    for j in reversed(range(1, m + 1)):
        parts.append(position[parts[-1]][j])
    return parts[::-1]


def by_params_split(cap: Captured, stages: int) -> list[int] | None:
    counts = [sum(cap.tensors.numel[n] for n in b.tensor_names if n in cap.tensors.trainable) for b in cap.blocks]
    bounds = deepspeed_partition_balanced(counts, stages)
    return bounds if all(a < b for a, b in zip(bounds, bounds[1:])) else None


def by_time_split(cap: Captured, stages: int, factor: float) -> list[int] | None:
    """torchgpipe ``balance_by_time``: min-max of per-block fwd + bwd time at the micro-batch
    size (``factor`` x the captured sample), contiguous, nothing else considered."""
    times = [b.scaled(factor) for b in cap.blocks]
    prefix = [0.0]
    for b in times:
        prefix.append(prefix[-1] + b.fwd_ms + b.bwd_ms)
    cost = lambda s, i, j: prefix[j] - prefix[i]  # noqa: E731
    found = min_max_partition(len(times), stages, cost, cost)
    return None if found is None else found[0]


# --------------------------------------------------------------------------------------------
# Evaluation.
# --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """A split's prediction: ``ms`` None means OOM; ``note`` says why there is no split."""

    ms: float | None = None
    layout: tuple[int, int, int] | None = None
    plan: PartitionPlan | None = None
    note: str = ""


@dataclass
class Row:
    devices: int
    ours: Outcome
    same_layout: dict[str, Outcome] = field(default_factory=dict)
    best_layout: dict[str, Outcome] = field(default_factory=dict)
    lower_bound_ms: float = 0.0
    seconds: float = 0.0
    ours_error: str = ""
    """The planner's message when no layout fits."""


class Baselines:
    def __init__(self, cap: Captured) -> None:
        self.cap = cap
        self._splits: dict[tuple[str, int, float], list[int] | None] = {}

    def split(self, name: str, stages: int, factor: float) -> list[int] | None:
        key = (name, stages, factor if name == "by-time" else 0.0)
        if key not in self._splits:
            if stages > len(self.cap.blocks):
                self._splits[key] = None
            elif name == "even-layers":
                self._splits[key] = even_layers_split(self.cap, stages)
            elif name == "by-params":
                self._splits[key] = by_params_split(self.cap, stages)
            else:
                self._splits[key] = by_time_split(self.cap, stages, factor)
        return self._splits[key]

    def evaluate(self, name: str, settings: SearchSettings, stages: int, replicas: int, microbatches: int) -> Outcome:
        factor = settings.global_batch_size / (replicas * microbatches)
        bounds = self.split(name, stages, factor)
        if bounds is None:
            why = f"S>{len(self.cap.layer_starts)} layers" if name == "even-layers" else "no split"
            return Outcome(note=why)
        found = evaluate_split(
            self.cap.blocks,
            bounds,
            replicas=replicas,
            microbatches=microbatches,
            reference_microbatch_size=1,
            settings=settings,
            tensors=self.cap.tensors,
        )
        layout = (stages, replicas, microbatches)
        return Outcome(layout=layout) if found is None else Outcome(found[0].predicted_step_ms, layout, found[0])


def layouts(settings: SearchSettings, num_blocks: int) -> list[tuple[int, int, int]]:
    """The (S, D, M) candidates ``search_plan`` looks at with one stage per rank (same rules as
    its enumeration: every divisor of the replica's batch)."""
    out = []
    n = settings.num_devices
    for stages in (s for s in range(1, min(n, num_blocks) + 1) if n % s == 0):
        replicas = n // stages
        if settings.global_batch_size % replicas:
            continue
        per_replica = settings.global_batch_size // replicas
        for m in range(1, settings.max_micro_batches + 1):
            fits = per_replica % m == 0 and per_replica // m >= settings.min_micro_batch_size
            if fits:
                out.append((stages, replicas, m))
    return out


def search(cap: Captured, settings: SearchSettings) -> tuple[SearchResult | None, str]:
    """``search_plan`` over the captured blocks; None and the planner's message if nothing fits."""
    try:
        result = search_plan(
            cap.blocks,
            reference_microbatch_size=1,
            settings=settings,
            tensors=cap.tensors,
            graph_fingerprint=cap.fingerprint,
        )
    except PlanError as error:
        return None, str(error)
    return result, ""


def run_row(cap: Captured, base: Baselines, settings: SearchSettings) -> Row:
    started = time.perf_counter()
    result, why = search(cap, settings)
    if result is not None:
        plan = result.plan
        layout = (plan.pipeline_stages, plan.num_replicas, plan.num_microbatches)
        row = Row(settings.num_devices, Outcome(plan.predicted_step_ms, layout, plan))
        for name in BASELINES:
            row.same_layout[name] = base.evaluate(name, settings, *layout)
    else:
        row = Row(settings.num_devices, Outcome(note="OOM"))
        row.ours_error = why
        row.same_layout = {name: Outcome(note="-") for name in BASELINES}
    candidates = layouts(settings, len(cap.blocks))
    # the search also tries offloading the optimizer for the shapes that do not fit without
    compared = {(c.stages, c.replicas, c.microbatches) for c in result.candidates} if result is not None else set()
    if result is not None and len(candidates) != len(compared):
        print(f"warning: {len(candidates)} layouts here, the search compared {len(compared)}")
    for name in BASELINES:
        outcomes = [base.evaluate(name, settings, *layout) for layout in candidates]
        fitting = [o for o in outcomes if o.ms is not None]
        row.best_layout[name] = (
            min(fitting, key=lambda o: math.inf if o.ms is None else o.ms) if fitting else Outcome(note="OOM")
        )
    whole_batch = [b.scaled(settings.global_batch_size) for b in cap.blocks]
    row.lower_bound_ms = sum(b.fwd_ms + b.bwd_ms for b in whole_batch) / settings.num_devices
    row.seconds = time.perf_counter() - started
    return row


# --------------------------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------------------------


def _layout(layout: tuple[int, int, int] | None) -> str:
    return "x".join(map(str, layout)) if layout else ""


def _cell(outcome: Outcome, ours: float | None) -> str:
    if outcome.ms is None:
        return outcome.note or "OOM"
    ratio = f" ({outcome.ms / ours:.2f}x)" if ours else ""
    return f"{outcome.ms:,.0f}{ratio}"


def print_tables(cap: Captured, rows: list[Row], splits: bool) -> None:
    ours_w = 12
    print("\n  (a) every partitioner on our S x D x M; cells: predicted step ms (ratio to ours)")
    header = f"  {'N':>3}  {'S x D x M':<10} {'ours ms':>{ours_w}}" + "".join(f"  {n:>17}" for n in BASELINES)
    header += f"  {'lower bound':>11}  {'ours/LB':>7}"
    print(header)
    for r in rows:
        ours = r.ours.ms
        line = f"  {r.devices:>3}  {_layout(r.ours.layout):<10} {_cell(r.ours, None):>{ours_w}}"
        line += "".join(f"  {_cell(r.same_layout[n], ours):>17}" for n in BASELINES)
        ratio = f"{ours / r.lower_bound_ms:.2f}" if ours else "-"
        line += f"  {r.lower_bound_ms:>11,.0f}  {ratio:>7}"
        print(line)
    print("  (b) every partitioner on its own best S x D x M (same candidates as the search); cells: ms S x D x M")
    print(f"  {'N':>3}  {'ours':>22}" + "".join(f"  {n:>22}" for n in BASELINES))
    for r in rows:
        cells = [r.ours, *(r.best_layout[n] for n in BASELINES)]
        text = [f"{c.ms:,.0f} {_layout(c.layout):<9}" if c.ms is not None else (c.note or "OOM") for c in cells]
        print(f"  {r.devices:>3}" + "".join(f"  {t:>22}" for t in text))
    if splits:
        for r in rows:
            shown = [("ours", r.ours), *((n, r.same_layout[n]) for n in BASELINES)]
            shown += [(f"{n} best", r.best_layout[n]) for n in BASELINES]
            print(f"\n  N={r.devices}: stage module spans and predicted memory (GiB)")
            for name, outcome in shown:
                if outcome.plan is None:
                    continue
                p = outcome.plan
                stages = " | ".join(
                    f"{s.module_span} [{s.memory.get('total', 0) / 2**30:.0f}{'c' if s.checkpoint else ''}]"
                    for s in p.stages
                )
                print(
                    f"    {name:<17} {_layout(outcome.layout):<9} {p.predicted_step_ms:>10,.0f} ms  "
                    f"bubble {max(0.0, p.predicted_bubble):.2f} exch {p.predicted_exchange_ms:,.0f} ms: {stages}"
                )


# --------------------------------------------------------------------------------------------
# Where memory binds: the joint search against the axes the planner had before.
# --------------------------------------------------------------------------------------------

MEMORY_FRACTION = 0.4
"""Per-device limit as a share of the one-device footprint. Plain data parallelism holds every
parameter and every gradient on each device (at least 2 P bytes for P bytes of parameters, with
ZeRO 0-2: ZeRO-2 reduces the gradients after the backward made them all), while the
footprint is 5 P with Adam (parameters, gradients, the step's temporary, two moments) and 4 P
with SGD and momentum: 40% of it, less the 10% margin, is under 2 P, so one stage never fits
whatever the replicas. At 25% the skewed model's 2.7B-parameter head (one block) fits on no
layout of 8 or 64 devices."""

JOINT = dict(
    zero_stage=None,
    virtual_stages=None,
    schedule="auto",
    zero_bubble=None,
    activation_checkpointing=None,
    offload_optimizer=None,
)
"""(a) Every axis left to the search: ZeRO 0, 1 or 2 per layout (and 3 for one stage and the
next shallower pipeline), interleaved 1F1B (V = 2, 3, 4) beside GPipe and 1F1B, zero bubble
where its bound beats the best plan, checkpointing
where memory demands it (a stage's first layers only where that fits), the optimizer offloaded
where nothing fits otherwise."""
DATA_PARALLEL = dict(JOINT, pipeline_stages=1, zero_stage=2)
"""Plain data parallelism: one stage, each parameter whole on every replica (ZeRO-2 holds the
least of ZeRO 0-2; ZeRO-3, which shards the parameters too, is what the joint search may add)."""
RESTRICTED = dict(
    zero_stage=1,
    virtual_stages=1,
    schedule="auto",
    zero_bubble=False,
    activation_checkpointing=None,
    selective_checkpointing=False,
    offload_optimizer=False,
)
"""(b) The axes the planner had before: S x D x M with ZeRO-1, GPipe or 1F1B (one stage per
rank), checkpointing whole stages. Its candidates are a subset of (a)'s, so (a) is never slower."""


@dataclass
class MemoryBoundRow:
    model: str
    devices: int
    limit: int
    data_parallel: PartitionPlan | None
    """The best one-stage plan under the limit (None: it does not fit, as the limit intends)."""
    joint: PartitionPlan | None
    restricted: PartitionPlan | None
    seconds: float


def one_device_footprint(cap: Captured, settings: SearchSettings) -> int:
    """Bytes the whole model takes on one device with no limit, micro-batches of one sample (the
    least activations) and no checkpointing: the planner's own memory model, as it would plan."""
    unlimited = replace(settings, num_devices=1, memory_limit=2**62, activation_checkpointing=False)
    found = evaluate_split(
        cap.blocks,
        [0, len(cap.blocks)],
        replicas=1,
        microbatches=settings.global_batch_size,
        reference_microbatch_size=1,
        settings=unlimited,
        tensors=cap.tensors,
    )
    assert found is not None  # nothing is out of memory without a limit
    return found[0].stages[0].memory["total"]


def memory_bound_rows(
    key: str, cap: Captured, settings_for: Callable[[int], SearchSettings], devices: Sequence[int], fraction: float
) -> list[MemoryBoundRow]:
    """One row per device count, all under the model's limit; the settings are the other tables'
    (``settings_for``) with only the limit and the axes of (a) or (b) changed."""
    limit = int(fraction * one_device_footprint(cap, settings_for(devices[0])))
    rows = []
    for n in devices:
        started = time.perf_counter()
        capped = replace(settings_for(n), memory_limit=limit)
        plans = [search(cap, replace(capped, **axes))[0] for axes in (DATA_PARALLEL, JOINT, RESTRICTED)]
        dp, joint, restricted = (None if p is None else p.plan for p in plans)
        rows.append(MemoryBoundRow(key, n, limit, dp, joint, restricted, time.perf_counter() - started))
    return rows


def _plan_text(plan: PartitionPlan | None) -> str:
    """S x D x M, schedule (with V when interleaved), ZeRO stage, checkpointed / all stages, ms."""
    if plan is None:
        return "OOM"
    schedule = {"gpipe": "GPipe", "1f1b": "1F1B", "zbv": "ZB-V"}.get(
        plan.schedule, f"interleaved V={plan.virtual_stages}"
    )
    schedule += " ZB" if plan.zero_bubble and plan.schedule != "zbv" else ""
    layout = f"{plan.pipeline_stages}x{plan.num_replicas}x{plan.num_microbatches}"
    recomputing = sum(s.checkpoint or s.recompute_end is not None for s in plan.stages)  # whole or first layers
    checkpointed = f"{recomputing}/{plan.num_stages}"
    return (
        f"{layout:<8} {schedule:<15} ZeRO-{plan.zero_stage} ckpt {checkpointed:<5} {plan.predicted_step_ms:>9,.0f} ms"
    )


def print_memory_bound(rows: list[MemoryBoundRow], fraction: float) -> None:
    print(
        f"\n== where memory binds: per-device limit {fraction:.0%} of the model's one-device footprint "
        f"(the planner's memory model, micro-batches of one sample, no checkpointing), 10% kept free; "
        f"search {sum(r.seconds for r in rows):.1f} s"
    )
    print(
        "   (a) joint: ZeRO 0/1/2, interleaved 1F1B V=2..4, GPipe/1F1B, zero bubble and ZB-V, selective checkpointing, "
        "offload; (b) restricted: ZeRO-1, GPipe/1F1B (V=1), whole-stage checkpointing; DP: best one-stage plan"
    )
    print("   cells: S x D x M, schedule, ZeRO stage, checkpointed stages / stages, predicted step; OOM: nothing fits")
    plan_w = 55
    print(
        f"  {'model':<7} {'N':>3} {'limit GiB':>9} {'DP':>4} | {'(a) joint':<{plan_w}} | "
        f"{'(b) restricted':<{plan_w}} | (b)/(a)"
    )
    for r in rows:
        dp = "OOM" if r.data_parallel is None else f"{r.data_parallel.predicted_step_ms:,.0f}"
        both = r.joint is not None and r.restricted is not None
        speedup = f"{r.restricted.predicted_step_ms / r.joint.predicted_step_ms:.2f}x" if both else "none"
        print(
            f"  {r.model:<7} {r.devices:>3} {r.limit / 2**30:>9.1f} {dp:>4} | {_plan_text(r.joint):<{plan_w}} | "
            f"{_plan_text(r.restricted):<{plan_w}} | {speedup}"
        )


def run_case(key: str, case: Case, args: argparse.Namespace, device: DeviceSpec) -> list[MemoryBoundRow]:
    started = time.perf_counter()
    with torch.device("meta"):
        module = case.model(**case.kwargs)
    optimizer = optimizer_kind(module)

    def settings_for(n: int) -> SearchSettings:
        return SearchSettings(
            num_devices=n,
            global_batch_size=case.global_batch,
            device=device,
            devices_per_node=args.devices_per_node,
            optimizer=optimizer,
            max_micro_batches=args.max_microbatches,
            # one stage per rank: the baselines split into S stages; interleaving is a schedule
            # choice any of them could add, compared separately in README
            virtual_stages=1,
            zero_bubble=False,  # likewise
            # the baselines are evaluated with ZeRO-1 on the devices (evaluate_split): the same
            # for our split
            zero_stage=1,
            offload_optimizer=False,
        )

    cap = capture(module, settings_for(args.devices[0]), args.max_blocks)
    captured_s = time.perf_counter() - started
    base = Baselines(cap)
    rows = [run_row(cap, base, settings_for(n)) for n in args.devices]
    kwargs = ", ".join(f"{k}={v}" for k, v in case.kwargs.items() if k != "batch_size")
    print(f"\n== {key}: {case.label}")
    print(
        f"   {case.model.__name__}({kwargs}): {cap.params / 1e9:.2f}B parameters, global batch "
        f"{case.global_batch}, optimizer {optimizer}; {cap.nodes} nodes in {len(cap.blocks)} blocks, "
        f"{len(cap.layer_starts)} layers ({cap.layer_container}.*); capture {captured_s:.1f} s, "
        f"search + baselines {sum(r.seconds for r in rows):.1f} s"
    )
    print_tables(cap, rows, args.splits)
    if not args.memory_bound:
        return []
    return memory_bound_rows(key, cap, settings_for, args.memory_devices, args.memory_fraction)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument(
        "--devices",
        nargs="+",
        type=int,
        help=f"device counts (default {DEVICES}; {MEMORY_BOUND_DEVICES} where memory binds)",
    )
    parser.add_argument("--device", default="h100", help="device preset for the analytic costs")
    parser.add_argument("--devices-per-node", type=int, default=8)
    parser.add_argument("--max-blocks", type=int, default=64, help="blocks the graph is grouped into (as plan_module)")
    parser.add_argument("--max-microbatches", type=int, default=64)
    parser.add_argument("--splits", action="store_true", help="print every split's stages")
    parser.add_argument(
        "--no-memory-bound", dest="memory_bound", action="store_false", help="skip the table where memory binds"
    )
    parser.add_argument(
        "--memory-fraction",
        type=float,
        default=MEMORY_FRACTION,
        help="per-device limit of the memory-bound table, as a share of the one-device footprint",
    )
    args = parser.parse_args(argv)
    args.memory_devices = args.devices or MEMORY_BOUND_DEVICES
    args.devices = args.devices or DEVICES

    started = time.perf_counter()
    device = get_device(args.device)
    print("$ python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    print(
        f"settings: device preset {device.name} ({device.memory_bytes / 1e9:.1f} GB, 10% kept free), "
        f"{args.devices_per_node} devices per node, N in {args.devices}, max {args.max_microbatches} micro-batches, "
        f"schedule auto (1F1B when M >= S, else GPipe), checkpointing per stage where memory demands it, "
        f"ZeRO-1 optimizer sharding over replicas, max_blocks={args.max_blocks}; models in float32, analytic "
        f"costs (FLOPs / achieved FLOP/s of the preset), captured for one sample and scaled linearly."
    )
    print(
        "baselines: split the same block chain; predicted with evaluate_split (same cost, memory, schedule "
        "and exchange models as the search); OOM = some stage does not fit even with checkpointing; "
        "lower bound = fwd+bwd of the global batch / N."
    )
    memory_rows = [row for key in args.only for row in run_case(key, CASES[key], args, device)]
    if args.memory_bound:
        print_memory_bound(memory_rows, args.memory_fraction)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
