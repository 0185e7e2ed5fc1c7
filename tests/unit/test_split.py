"""Cutting the captured graph anywhere gives stages whose composition is the original step."""

import random

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_rannc._utils import tensor_bytes
from lightning_rannc.capture.export import capture_training_step
from lightning_rannc.capture.graph import StepGraph, group_nodes
from lightning_rannc.capture.split import build_range_module

from helpers.models import GPT, ResCNN


class SkipDAG(L.LightningModule):
    """A skip connection spanning the whole model, a value used by many later nodes, a tuple op."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 3)

    def training_step(self, batch, batch_idx):
        x, mask, y = batch
        h0 = torch.tanh(self.a(x))
        top, _ = torch.max(h0, dim=-1, keepdim=True)  # max returns a (values, indices) tuple
        h1 = torch.tanh(self.b(h0 * mask)) + h0
        h2 = torch.tanh(self.b(h1)) + h0 - top
        return F.cross_entropy(self.c(h2 + x), y)


def _skip_batch():
    return (torch.randn(4, 6), (torch.rand(4, 6) > 0.3).float(), torch.randint(0, 3, (4,)))


def _gpt():
    tokens = torch.randint(0, 256, (2, 16))
    return GPT(layers=2, dim=16, seq_len=16), {"tokens": tokens, "targets": tokens.roll(1, 1)}


def _cnn():
    return ResCNN(channels=4, blocks=2), (torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,)))


@pytest.mark.parametrize("make", [lambda: (SkipDAG(), _skip_batch()), _gpt, _cnn], ids=["skip", "gpt", "cnn"])
@pytest.mark.parametrize("seed", range(3))
def test_stages_compose_to_the_step_and_give_its_gradients(make, seed: int) -> None:
    torch.manual_seed(seed)
    module, batch = make()
    module.log = lambda *a, **k: None
    graph = StepGraph.from_captured(capture_training_step(module, batch))
    allowed = [b for b, ok in enumerate(graph.cut_allowed()) if ok and 0 < b < len(graph)]
    cuts = sorted(random.Random(seed).sample(allowed, k=min(3, len(allowed))))
    bounds = [0, *cuts, len(graph)]

    expected = module.training_step(batch, 0)
    expected.backward()
    reference = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)

    values = tuple(leaf for leaf in torch.utils._pytree.tree_flatten(batch)[0])
    for a, b in zip(bounds, bounds[1:]):
        values = build_range_module(graph, a, b)(*values)
    loss = values[0]
    torch.testing.assert_close(loss, expected.detach())
    loss.backward()
    for name, param in module.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], msg=name)


def test_stage_modules_hold_only_their_own_parameters_by_module_name() -> None:
    module, batch = _gpt()
    module.log = lambda *a, **k: None
    graph = StepGraph.from_captured(capture_training_step(module, batch))
    cut = next(b for b, ok in enumerate(graph.cut_allowed()) if ok and graph.module_path(b).startswith("blocks.1"))
    first, second = build_range_module(graph, 0, cut), build_range_module(graph, cut, len(graph))
    first_names = {n for n, _ in first.named_parameters()}
    assert "blocks.0.qkv.weight" in first_names and "blocks.1.mlp.2.weight" not in first_names
    assert "tok_emb.weight" in first_names and "tok_emb.weight" in {n for n, _ in second.named_parameters()}
    params = dict(module.named_parameters())
    assert all(p is params[n] for n, p in first.named_parameters())


def test_values_used_far_downstream_cross_every_cut_in_between() -> None:
    module = SkipDAG()
    graph = StepGraph.from_captured(capture_training_step(module, _skip_batch()))
    labels = graph.inputs[2]
    h0 = next(n for n in graph.nodes if n.target == torch.ops.aten.tanh.default)
    last_use_of_h0 = max(i for i, n in enumerate(graph.nodes) if h0 in n.all_input_nodes)
    for boundary in range(graph.nodes.index(h0) + 1, last_use_of_h0 + 1):
        live = graph.live_values(boundary)
        assert labels in live and h0 in live
    cut_bytes = graph.cut_bytes()
    for boundary in range(1, len(graph)):
        assert cut_bytes[boundary] == sum(tensor_bytes(v.meta["val"]) for v in graph.live_values(boundary))


def test_cuts_never_split_a_tuple_from_its_items() -> None:
    graph = StepGraph.from_captured(capture_training_step(SkipDAG(), _skip_batch()))
    max_index = next(i for i, n in enumerate(graph.nodes) if "max" in str(n.target))
    assert not graph.cut_allowed()[max_index + 1]
    for start, end in group_nodes(graph, max_blocks=100):
        assert not (start <= max_index < end - 1 and end == max_index + 1)
    spans = group_nodes(graph, max_blocks=3)
    assert len(spans) == 3 and spans[0][0] == 0 and spans[-1][1] == len(graph)
    assert all(a < b == c for (a, b), (c, _) in zip(spans, spans[1:]))


def test_blocks_of_a_transformers_model_split_its_layers_by_parameters() -> None:
    """With two blocks per layer, each block of transformers' GPT-2 holds part of a layer's
    parameters. Merging by node count alone made whole-layer blocks and parameter-free ones (the
    attention's many reshapes outweighed the linears), so stages could only be whole layers."""
    import transformers  # in the dev extras

    from helpers.hf_models import HFModule

    config = transformers.GPT2Config(
        n_layer=4, n_embd=64, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    module = HFModule("gpt2")
    module.model = transformers.GPT2LMHeadModel(config)
    module.log = lambda *args, **kwargs: None  # no Trainer
    graph = StepGraph.from_captured(capture_training_step(module, torch.randint(1, 128, (2, 16))))
    layer = sum(p.numel() for p in module.model.transformer.h[0].parameters())
    spans = group_nodes(graph, max_blocks=8)
    held = [sum(graph.tensors[n].numel() for n in graph.tensor_names(a, b) if n.endswith(".weight")) for a, b in spans]
    assert len(spans) == 8
    assert all(0 < count < layer for count in held), held
