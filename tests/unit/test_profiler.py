import copy

import torch

from lightning_rannc.capture.export import capture_training_step
from lightning_rannc.capture.graph import StepGraph, group_nodes
from lightning_rannc.profile.profiler import find_no_grad_values, profile_blocks

from models import GPT, LoggingMLP


def _gpt_graph():
    model = GPT(layers=2, dim=16, seq_len=16)
    model.log = lambda *a, **k: None
    tokens = torch.randint(0, 256, (2, 16))
    leaves = [tokens, tokens.roll(1, 1)]
    return (
        model,
        StepGraph.from_captured(capture_training_step(model, {"tokens": leaves[0], "targets": leaves[1]})),
        leaves,
    )


def test_blocks_are_timed_and_their_saved_activations_counted() -> None:
    model, graph, leaves = _gpt_graph()
    spans = group_nodes(graph, max_blocks=8)
    rng_before = torch.get_rng_state()
    costs = profile_blocks(graph, leaves, spans, repeats=2)
    assert [(c.start, c.end) for c in costs] == spans
    assert all(c.fwd_ms > 0 and c.bwd_ms >= 0 for c in costs)
    assert sum(c.bwd_ms for c in costs) > 0
    assert sum(c.activation_bytes for c in costs) > 0
    assert {n for c in costs for n in c.tensor_names} >= {"tok_emb.weight", "blocks.1.mlp.0.weight"}
    assert costs[-1].cut_bytes == 0 and any(c.cut_bytes > 0 for c in costs[:-1])
    assert torch.equal(torch.get_rng_state(), rng_before)  # profiling leaves training's RNG alone
    assert all(p.grad is None for p in model.parameters())


def test_values_without_gradient_are_found() -> None:
    model = LoggingMLP()
    model.log = lambda *a, **k: None
    model.log_dict = lambda *a, **k: None
    batch = torch.cat([torch.randn(4, 12), torch.randint(0, 4, (4, 1)).float()], dim=1)
    captured = capture_training_step(model, batch)
    graph = StepGraph.from_captured(captured)
    middle = next(b for b, ok in enumerate(graph.cut_allowed()) if ok and graph.module_path(b) == "net.2")
    no_grad = find_no_grad_values(graph, [batch], [middle])
    assert {v.name for v in graph.outputs[1:]} <= set(no_grad)  # the returned metric `acc`
    activation = [
        v for v in graph.live_values(middle) if v.meta["val"].is_floating_point() and v.meta["val"].dim() == 2
    ]
    assert any(v.name not in no_grad for v in activation)  # the hidden state carries gradient


def _analytic_gpt_costs(model, tokens, max_blocks):
    from lightning_rannc.capture.export import fake_module_state
    from lightning_rannc.plan.devices import get_device
    from lightning_rannc.profile.analytic import estimate_blocks

    with fake_module_state(model, torch.device("cpu")) as mode:
        leaves = [mode.from_tensor(tokens), mode.from_tensor(tokens.roll(1, 1))]
        graph = StepGraph.from_captured(capture_training_step(model, {"tokens": leaves[0], "targets": leaves[1]}))
        return estimate_blocks(graph, leaves, group_nodes(graph, max_blocks), device=get_device("h100"))


def test_analytic_costs_follow_flops_without_running_anything() -> None:
    model = GPT(layers=2, dim=256, seq_len=64).to("meta")
    model.log = lambda *a, **k: None
    tokens = torch.randint(0, 256, (4, 64))
    costs = _analytic_gpt_costs(model, tokens, max_blocks=8)
    assert all(c.fwd_ms > 0 and c.bwd_ms > 0 for c in costs)
    assert all(0 <= c.fwd_fixed_ms <= c.fwd_ms and 0 < c.bwd_fixed_ms < c.bwd_ms for c in costs)
    # A model this small is launch-bound on an H100; the part that grows with the batch is the
    # device's work, and matmuls dominate it.
    heavy = max(costs, key=lambda c: c.fwd_ms - c.fwd_fixed_ms)
    assert any("mlp" in p or "qkv" in p or "head" in p for p in heavy.module_paths)
    # The loss's backward holds the gradient of the logits twice (log-softmax and its input).
    logits_bytes = 4 * 64 * 256 * 4
    assert max(c.workspace_bytes for c in costs) >= 2 * logits_bytes
    assert all(p.is_meta for p in model.parameters())


def test_analytic_activations_are_what_the_profiler_measures() -> None:
    model, graph, leaves = _gpt_graph()
    measured = profile_blocks(graph, leaves, [(0, len(graph))], repeats=1)[0].activation_bytes
    estimated = _analytic_gpt_costs(copy.deepcopy(model).to("meta"), leaves[0], max_blocks=1)[0].activation_bytes
    assert estimated == measured
