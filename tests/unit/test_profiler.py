import copy
import logging

import pytest
import torch

from lightning_rannc.capture.batch import FlatBatch
from lightning_rannc.capture.export import capture_training_step
from lightning_rannc.capture.graph import StepGraph, group_nodes
from lightning_rannc.config import RaNNCConfig
from lightning_rannc.plan.cost_model import BlockCost, with_fixed_parts, with_larger_timing
from lightning_rannc.profile import profiler
from lightning_rannc.profile.cache import ProfileCache
from lightning_rannc.profile.profiler import find_no_grad_values, profile_blocks
from lightning_rannc.runtime import planning
from lightning_rannc.runtime.captures import ResizedSample, timing_samples
from lightning_rannc.runtime.planning import EngineOptions, block_costs

from helpers.models import GPT, LoggingMLP


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


def test_each_block_is_timed_without_the_backward_call_a_stage_makes_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # the profile times each block by its own backward call; a stage runs its blocks' backwards
    # in one, whose cost the runtime's overhead per action stands for: each block's backward
    # leaves one call's cost out, and never goes below 0
    assert 0 < profiler.backward_call_ms(torch.device("cpu"), repeats=10) < 10
    model, graph, leaves = _gpt_graph()
    spans = group_nodes(graph, max_blocks=8)
    timed = iter([(1.0, 5.0, 8, 0), (1.0, 0.2, 8, 0), (1.0, 0.0, 8, 0)] * len(spans))
    monkeypatch.setattr(profiler, "_time_block", lambda *_: next(timed))
    monkeypatch.setattr(profiler, "backward_call_ms", lambda device: 0.5)
    costs = profile_blocks(graph, leaves, spans, repeats=1)
    assert [c.bwd_ms for c in costs[:3]] == [4.5, 0.0, 0.0] and all(c.fwd_ms == 1.0 for c in costs)


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
    from lightning_rannc.capture.module_state import fake_module_state
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


def test_measured_workspace_is_what_the_analytic_estimate_follows() -> None:
    # The loss's backward holds the logits' gradient twice, beyond saved activations and
    # parameter gradients: measured on the real run as the analytic estimate does on fakes.
    model, graph, leaves = _gpt_graph()
    measured = profile_blocks(graph, leaves, [(0, len(graph))], repeats=1)[0].workspace_bytes
    estimated = _analytic_gpt_costs(copy.deepcopy(model).to("meta"), leaves[0], max_blocks=1)[0].workspace_bytes
    logits_bytes = 2 * 16 * 256 * 4
    assert measured >= 2 * logits_bytes
    assert 0.8 * estimated <= measured <= 1.25 * estimated


def test_profiling_keeps_only_the_values_blocks_take(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_rannc.profile import profiler

    model, graph, leaves = _gpt_graph()
    spans = group_nodes(graph, max_blocks=4)
    kept: list[int] = []
    original = profiler.run_graph

    def counting(*args, **kwargs):
        values = original(*args, **kwargs)
        kept.append(len(values))
        return values

    monkeypatch.setattr(profiler, "run_graph", counting)
    profile_blocks(graph, leaves, spans, repeats=1)
    needed = {v for a, _ in spans for v in graph.stage_inputs(a)}
    assert kept == [len(needed)] and len(needed) < len(graph) / 4


def test_values_without_gradient_are_found_without_running_the_step() -> None:
    # Found on fake tensors: the real parameters get no gradient and nothing runs for real.
    model, graph, leaves = _gpt_graph()
    boundaries = [b for b, ok in enumerate(graph.cut_allowed()) if ok][1:3]
    with torch.autograd.graph.saved_tensors_hooks(_refuse_real, lambda t: t):
        no_grad = find_no_grad_values(graph, leaves, boundaries)
    assert isinstance(no_grad, list)
    assert all(p.grad is None for p in model.parameters())


def _refuse_real(tensor: torch.Tensor) -> torch.Tensor:
    from lightning_rannc._compat import is_fake

    assert is_fake(tensor), "a real tensor was saved for backward"
    return tensor


def _cost(fwd_ms: float, bwd_ms: float) -> BlockCost:
    return BlockCost(start=0, end=1, fwd_ms=fwd_ms, bwd_ms=bwd_ms, activation_bytes=800, cut_bytes=80)


def test_fixed_parts_come_from_timings_at_two_sizes() -> None:
    # 1 ms per forward and 2 per backward whatever the size, then 0.5 and 1 ms per sample
    large, small = _cost(1 + 8 * 0.5, 2 + 8 * 1.0), _cost(1 + 2 * 0.5, 2 + 2 * 1.0)
    [fitted] = with_fixed_parts([large], [small], size=8, smaller_size=2)
    assert fitted.fwd_fixed_ms == pytest.approx(1.0) and fitted.bwd_fixed_ms == pytest.approx(2.0)
    scaled = fitted.scaled(2 / 8)
    assert (scaled.fwd_ms, scaled.bwd_ms) == (pytest.approx(small.fwd_ms), pytest.approx(small.bwd_ms))
    assert large.scaled(2 / 8).fwd_ms < small.fwd_ms  # in proportion, the small one looks cheaper than it ran
    # noisy timings: a negative intercept is 0; a smaller micro-batch that ran slower makes the
    # whole time fixed (never more than either timing)
    [noisy] = with_fixed_parts([_cost(10.0, 10.0)], [_cost(1.0, 12.0)], size=8, smaller_size=2)
    assert noisy.fwd_fixed_ms == 0.0 and noisy.bwd_fixed_ms == 10.0
    with pytest.raises(ValueError, match="smaller_size"):
        with_fixed_parts([large], [small], size=8, smaller_size=8)


def test_a_larger_timing_gives_the_growth_beyond_proportion() -> None:
    # 2 ms forward and 4 ms backward on 4 samples; on 16 samples 4.5 times as long, not 4
    reference, larger = _cost(2.0, 4.0), _cost(9.0, 18.0)
    [timed] = with_larger_timing([reference], [larger], size=4, larger_size=16)
    assert timed.larger_factor == 4.0
    assert (timed.scaled(4).fwd_ms, timed.scaled(4).bwd_ms) == (pytest.approx(9.0), pytest.approx(18.0))
    # in proportion (no smaller timing, so the line goes through 0) plus the 1 ms excess at 16
    # samples, growing with the square of the way there
    assert timed.scaled(2).fwd_ms == pytest.approx(4.0 + 1.0 / 9)
    assert timed.scaled(8).fwd_ms == pytest.approx(16.0 + 1.0 * 49 / 9)
    assert reference.scaled(4).fwd_ms == pytest.approx(8.0)  # in proportion: shorter than it ran
    # with a fixed part from a smaller timing, the line is the one through the two smaller timings
    [fixed] = with_fixed_parts([reference], [_cost(1.5, 3.0)], size=4, smaller_size=2)
    [both] = with_larger_timing([fixed], [larger], size=4, larger_size=16)
    assert both.scaled(0.5).fwd_ms == pytest.approx(1.5) and both.scaled(4).fwd_ms == pytest.approx(9.0)
    assert both.scaled(2).fwd_ms == pytest.approx(1.0 + 0.25 * 8 + (9.0 - 5.0) / 9)
    halved = timed.scaled(0.5)  # below the reference size, as without the larger timing
    assert halved.fwd_ms == reference.scaled(0.5).fwd_ms and halved.activation_bytes == 400
    assert halved.larger_factor == 0.0  # a scaled cost is for one size
    # a noisy larger timing below the reference's never makes a larger micro-batch cheaper
    [noisy] = with_larger_timing([reference], [_cost(1.0, 4.0)], size=4, larger_size=16)
    assert noisy.scaled(4).fwd_ms == pytest.approx(2.0) and noisy.scaled(4).bwd_ms == pytest.approx(4.0)
    with pytest.raises(ValueError, match="larger_size"):
        with_larger_timing([reference], [larger], size=4, larger_size=4)


def _timings(graph, leaves, spans, repeats=3):
    """A stand-in profiler: 1 ms forward and 2 ms backward per block, plus 0.5 and 1 ms per
    sample, and on 16 samples 10% more."""
    size = int(leaves[0].shape[0])
    more = 1.1 if size == 16 else 1.0
    return [
        BlockCost(
            start=a, end=b, fwd_ms=(1 + 0.5 * size) * more, bwd_ms=(2 + 1.0 * size) * more, activation_bytes=0,
            cut_bytes=0,
        )
        for a, b in spans
    ]  # fmt: skip


def test_blocks_are_timed_again_on_the_smallest_and_largest_micro_batch_the_search_may_pick(
    monkeypatch, caplog
) -> None:
    model = GPT(layers=2, dim=16, seq_len=16)
    model.log = lambda *a, **k: None
    tokens = torch.randint(0, 256, (16, 16))
    batch = {"tokens": tokens, "targets": tokens.roll(1, 1)}
    options = EngineOptions(config=RaNNCConfig(micro_batches="auto", max_blocks=8), pipeline_stages=2)
    four = EngineOptions(config=RaNNCConfig(micro_batches=4, max_blocks=8), pipeline_stages=2)
    flat = FlatBatch.of(batch, "here")
    assert timing_samples(model, flat, 4, four) == []  # the count is given: costs at that size only
    # 2 samples are too close to 3 for a fit, 16 too close to 9
    assert [sample.size for sample in timing_samples(model, flat, 3, options)] == [16]
    assert [sample.size for sample in timing_samples(model, flat, 9, options)] == [2]
    samples = timing_samples(model, flat, 4, options)
    assert [sample.size for sample in samples] == [2, 16]
    graph = StepGraph.from_captured(capture_training_step(model, {k: v[:4] for k, v in batch.items()}))
    for sample in samples:  # the real captures
        other_graph, other_leaves = sample.capture()
        assert other_leaves[0].shape[0] == sample.size and len(other_graph) == len(graph)

    monkeypatch.setattr(planning, "profile_blocks", _timings)
    captures: list[int] = []
    counted = [ResizedSample(s.size, lambda s=s: captures.append(s.size) or s.capture()) for s in samples]
    micro = [batch["tokens"][:4], batch["targets"][:4]]
    cache = ProfileCache()
    linear = block_costs(graph, micro, four, cache, False)
    fitted = block_costs(graph, micro, options, cache, False, counted)
    assert all(c.fwd_fixed_ms == 0 and c.bwd_fixed_ms == 0 and c.larger_factor == 0 for c in linear)
    assert all(c.fwd_fixed_ms == pytest.approx(1.0) and c.bwd_fixed_ms == pytest.approx(2.0) for c in fitted)
    assert all(c.scaled(4).fwd_ms == pytest.approx(9 * 1.1) and c.scaled(0.5).fwd_ms == 2.0 for c in fitted)
    assert block_costs(graph, micro, options, cache, False, counted) == fitted and captures == [2, 16]  # cached

    def fails() -> tuple:
        raise RuntimeError("the step needs 4 samples")

    with caplog.at_level(logging.WARNING, logger="lightning_rannc"):
        kept = block_costs(graph, micro, options, ProfileCache(), False, [ResizedSample(2, fails), counted[1]])
    assert "could not time the step on micro-batches of 2 samples (the step needs 4 samples)" in caplog.text
    assert all(c.fwd_fixed_ms == 0 and c.larger_factor == 4 for c in kept)  # the other timing still counts
