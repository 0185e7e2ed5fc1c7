"""Our small IR over the exported step: compute nodes in order, and the values that cross a cut.

A stage is a contiguous range ``[start, end)`` of compute nodes in the exported graph's
topological order. Everything the planner and the runtime need to know about a cut between
node ``b - 1`` and node ``b`` is here: which values are live across it (they must be sent to
the next stage, including values only used much later, such as labels or skip connections),
how many bytes they are, and whether the cut is allowed at all.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from lightning_rannc._utils import layer_of, tensor_bytes
from lightning_rannc.capture.export import CapturedStep

__all__ = ["StepGraph", "group_nodes", "align_nodes"]

_COMPUTE_OPS = ("call_function", "get_attr", "call_method", "call_module")


@dataclass(eq=False)
class StepGraph:
    """Ordered view of a captured step's graph, shared by the profiler, planner glue and runtime."""

    graph_module: fx.GraphModule
    nodes: list[fx.Node]
    """Compute nodes in topological order; stages are contiguous ranges of this list."""
    inputs: list[fx.Node]
    """User-input placeholders: the micro-batch's tensor leaves, in order."""
    outputs: list[fx.Node]
    """Graph outputs: the loss, then logged values, then extra returned tensors."""
    tensor_of: dict[fx.Node, str]
    """Placeholder of a parameter/buffer/constant -> its canonical tensor name."""
    tensors: dict[str, torch.Tensor]
    """Canonical tensor name -> tensor."""
    written_buffers: list[str]
    """Buffers updated in place by the step."""

    @classmethod
    def from_captured(cls, captured: CapturedStep) -> StepGraph:
        assert captured.program is not None, "the captured program was already dropped"
        gm = captured.program.graph_module
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        tensor_of = {
            n: captured.placeholder_names[n.name] for n in placeholders if n.name in captured.placeholder_names
        }
        output_node = next(n for n in gm.graph.nodes if n.op == "output")
        graph = cls(
            graph_module=gm,
            nodes=[n for n in gm.graph.nodes if n.op in _COMPUTE_OPS],
            inputs=[n for n in placeholders if n not in tensor_of],
            outputs=list(output_node.args[0]),
            tensor_of=tensor_of,
            tensors=captured.tensors,
            written_buffers=list(captured.written_buffers),
        )
        graph._index()
        return graph

    def _index(self) -> None:
        self._def = {v: -1 for v in self.inputs}
        self._def.update({n: i for i, n in enumerate(self.nodes)})
        self._last_use = {v: -1 for v in self._def}
        for i, node in enumerate(self.nodes):
            for value in node.all_input_nodes:
                if value in self._def:
                    self._last_use[value] = max(self._last_use[value], i)
        for value in self.outputs:
            self._last_use[value] = len(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def live_values(self, boundary: int) -> list[fx.Node]:
        """Values made before node ``boundary`` and still needed at or after it, in definition order."""
        return [v for v, d in self._def.items() if d < boundary <= self._last_use[v]]

    def stage_inputs(self, start: int) -> list[fx.Node]:
        # The first stage takes the whole micro-batch: the schedule hands it every leaf.
        return list(self.inputs) if start == 0 else self.live_values(start)

    def stage_outputs(self, end: int) -> list[fx.Node]:
        return list(self.outputs) if end == len(self.nodes) else self.live_values(end)

    def tensor_names(self, start: int, end: int) -> list[str]:
        """Canonical names of the parameters/buffers/constants used by nodes ``[start, end)``."""
        names: dict[str, None] = {}
        for node in self.nodes[start:end]:
            for value in node.all_input_nodes:
                if value in self.tensor_of:
                    names[self.tensor_of[value]] = None
        return list(names)

    def cut_bytes(self) -> list[int]:
        """Bytes live across each boundary ``b`` in ``0..len(nodes)`` (index 0 and the end are 0)."""
        delta = [0] * (len(self.nodes) + 2)
        for value, defined in self._def.items():
            last = min(self._last_use[value], len(self.nodes))
            if last > defined and last >= 1:
                size = tensor_bytes(value.meta.get("val"))
                delta[max(defined + 1, 1)] += size
                delta[last + 1] -= size
        running, out = 0, []
        for b in range(len(self.nodes) + 1):
            running += delta[b]
            out.append(running if 0 < b < len(self.nodes) else 0)
        return out

    def cut_allowed(self) -> list[bool]:
        """Whether the graph may be cut before node ``b``: only tensors can cross stages."""
        allowed = [True] * (len(self.nodes) + 1)
        for value, defined in self._def.items():
            if not isinstance(value.meta.get("val"), torch.Tensor):
                for b in range(defined + 1, min(self._last_use[value], len(self.nodes)) + 1):
                    allowed[b] = False
        return allowed

    def module_path(self, index: int) -> str:
        """Module path of a compute node in the user's module (``""`` for the module itself)."""
        stack = self.nodes[index].meta.get("nn_module_stack") or {}
        path = next(reversed(stack.values()))[0] if stack else ""
        path = path.removeprefix("module").removeprefix(".")
        return path.replace("._modules['", ".").replace("']", "").removeprefix("L['self'].")

    def node_keys(self) -> list[tuple[str, str]]:
        """What identifies a node across captures of other batch shapes: its op and module."""
        return [(str(node.target), self.module_path(i)) for i, node in enumerate(self.nodes)]

    def fingerprint(self) -> str:
        """A hash of the graph's structure (ops, edges, dtypes, ranks; not sizes), to detect stale
        plans and ranks that traced differently. Batches of other sizes keep the fingerprint."""
        digest = hashlib.sha256()
        for node in [*self.inputs, *self.nodes]:
            digest.update(f"{node.op}|{node.target}|{_describe(node.meta.get('val'))}|".encode())
            digest.update(",".join(a.name for a in node.all_input_nodes).encode())
        digest.update(",".join(v.name for v in self.outputs).encode())
        return digest.hexdigest()[:16]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dim()}d:{value.dtype}"
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_describe(v) for v in value) + ")"
    return type(value).__name__


def group_nodes(graph: StepGraph, max_blocks: int) -> list[tuple[int, int]]:
    """Group consecutive nodes into at most ``max_blocks`` blocks ``(start, end)`` of about equal
    weight, cut between layers wherever a layer boundary is near.

    A block may start only where the module path changes (blocks follow module boundaries) and
    the graph may be cut. Profiling measures blocks, and the planner only cuts between blocks,
    so blocks are made even: a node's weight is ``1 / nodes`` plus its parameters' share of the
    model's (each counted at its first use), and block ``k`` ends at the allowed start nearest
    to ``k / max_blocks`` of the total weight, or at a layer's first node (``layer_of``) within
    half a block of it. Merging the two lightest neighbours instead, by node count, made
    transformers' GPT-2 (whose attention has many small nodes) one block per layer with
    parameter-free blocks between layers; by weight, whole layers in one half of a 96-layer
    model and half layers in the other, where a 64-stage plan did not fit.
    """
    allowed = graph.cut_allowed()
    paths = [graph.module_path(i) for i in range(len(graph))]
    starts = [0] + [i for i in range(1, len(graph)) if allowed[i] and paths[i] != paths[i - 1]]
    layers = {i for i in starts[1:] if layer_of(paths[i]) != layer_of(paths[i - 1])}
    return _even_blocks(starts, len(graph), max(1, max_blocks), _weights(graph), layers)


def _weights(graph: StepGraph) -> list[float]:
    """Prefix sums of each node's weight: ``1 / nodes`` plus its new parameters' share."""
    numel = [0] * len(graph)
    seen: set[str] = set()
    for index, node in enumerate(graph.nodes):
        for value in node.all_input_nodes:
            name = graph.tensor_of.get(value)
            tensor = graph.tensors.get(name) if name is not None else None
            if name is not None and name not in seen and isinstance(tensor, torch.nn.Parameter):
                seen.add(name)
                numel[index] += tensor.numel()
    total = max(1, sum(numel))
    prefix, running = [0.0], 0.0
    for count in numel:
        running += 1 / len(graph) + count / total
        prefix.append(running)
    return prefix


def _even_blocks(
    starts: list[int], end: int, count: int, prefix: list[float], layers: set[int]
) -> list[tuple[int, int]]:
    """Spans from ``starts`` (the allowed block starts) whose ends fall nearest to ``count``
    equal shares of the weight (``prefix``: prefix sums over the nodes), a start in ``layers``
    preferred within half a share."""
    if len(starts) <= count:
        return list(zip(starts, [*starts[1:], end]))
    share = prefix[end] / count
    chosen = [0]
    position = 1  # index into ``starts``: candidates after the last chosen start
    for k in range(1, count):
        target = k * share
        while position < len(starts) and prefix[starts[position]] < target - share / 2:
            position += 1
        window = []
        for start in starts[position:]:
            if prefix[start] > target + share / 2:
                break
            window.append(start)
        if not window:
            continue
        pool = [s for s in window if s in layers] or window
        pick = min(pool, key=lambda s: (abs(prefix[s] - target), s))
        chosen.append(pick)
        position = starts.index(pick, position) + 1
    return list(zip(chosen, [*chosen[1:], end]))


def align_nodes(old: list[tuple[str, str]], new: list[tuple[str, str]]) -> dict[int, int]:
    """Match the nodes of two captures of one step (``node_keys``): old index -> new index.

    Another batch shape can add or drop a few nodes (a slice that is a no-op at full length
    disappears); everything else keeps its order, so a longest-matching alignment finds it.
    """
    matcher = difflib.SequenceMatcher(a=old, b=new, autojunk=False)
    return {block.a + k: block.b + k for block in matcher.get_matching_blocks() for k in range(block.size)}
