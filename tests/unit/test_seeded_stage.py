"""Random streams follow the computation: same masks whatever the stage split or schedule."""

import lightning as L
import torch
from torch import nn

from lightning_rannc._compat import _RecomputeOnceInWeightPass
from lightning_rannc.capture.export import capture_training_step
from lightning_rannc.capture.graph import StepGraph
from lightning_rannc.capture.split import build_range_module
from lightning_rannc.runtime.pipeline import SeededStage


class TwoDropouts(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)

    def training_step(self, batch, batch_idx):
        return self.b(self.drop(torch.tanh(self.a(self.drop(batch))))).sum()


def _graph() -> StepGraph:
    return StepGraph.from_captured(capture_training_step(TwoDropouts(), torch.ones(4, 8)))


def _run(graph: StepGraph, cuts: list[int], microbatch: int, step: int = 1, replica: int = 0) -> torch.Tensor:
    values: tuple = (torch.ones(4, 8),)
    for a, b in zip([0, *cuts], [*cuts, len(graph)]):
        stage = SeededStage(build_range_module(graph, a, b), replica, torch.device("cpu"))
        stage.start_step(seed=7, step=step)
        stage.microbatch = microbatch
        values = stage(*values)
    return values[0]


def test_masks_do_not_depend_on_the_stage_split() -> None:
    graph = _graph()
    cut = next(b for b in range(1, len(graph)) if graph.cut_allowed()[b] and graph.module_path(b) == "b")
    whole = _run(graph, [], microbatch=0)
    assert torch.equal(whole, _run(graph, [cut], microbatch=0))
    assert torch.equal(whole, _run(graph, [], microbatch=0))  # reproducible


def test_micro_batches_steps_and_replicas_draw_different_masks_without_touching_training_rng() -> None:
    graph = _graph()
    before = torch.get_rng_state()
    first = _run(graph, [], microbatch=0)
    assert not torch.equal(first, _run(graph, [], microbatch=1))
    assert not torch.equal(first, _run(graph, [], microbatch=0, step=2))
    assert not torch.equal(first, _run(graph, [], microbatch=0, replica=1))
    assert torch.equal(torch.get_rng_state(), before)


def test_reseeding_queues_no_cuda_work() -> None:
    # torch.manual_seed queues a CUDA call with a formatted stack per call while CUDA is idle:
    # milliseconds each, and an unbounded queue. Stages reseed at every random op.
    graph = _graph()
    queued = len(getattr(torch.cuda, "_queued_calls", []))
    for microbatch in range(20):
        _run(graph, [], microbatch=microbatch)
    assert len(getattr(torch.cuda, "_queued_calls", [])) == queued


def test_checkpointed_stage_recomputes_with_the_same_masks_and_keeps_fewer_activations() -> None:
    graph = _graph()
    module = build_range_module(graph, 0, len(graph))
    results = []
    for checkpoint in (False, True):
        stage = SeededStage(module, 0, torch.device("cpu"), checkpoint=checkpoint)
        stage.start_step(seed=7, step=1)
        saved: list[int] = []

        def pack(t: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = stage(torch.ones(4, 8))[0]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in module.parameters()], sum(saved)))
        module.zero_grad(set_to_none=True)
    (plain_loss, plain_grads, plain_saved), (ckpt_loss, ckpt_grads, ckpt_saved) = results
    assert torch.equal(plain_loss, ckpt_loss)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, ckpt_grads))
    assert ckpt_saved < plain_saved


class _PerGroupWeightPass:
    """A weight pass as torch's ``stage_backward_weight`` runs it: one ``autograd.grad`` per
    parameter group, here one per branch of a checkpointed region."""

    def __init__(self, loss: torch.Tensor, groups: list[nn.Module]) -> None:
        self.loss, self.groups = loss, groups

    def backward_weight_one_chunk(self, bwd_chunk_id: int) -> list[torch.Tensor]:
        return [torch.autograd.grad(self.loss, m.weight, retain_graph=True)[0] for m in self.groups]


class _RecomputingOnce(_RecomputeOnceInWeightPass, _PerGroupWeightPass):
    pass


def test_zero_bubble_weight_pass_recomputes_a_region_once_for_all_its_parameter_groups() -> None:
    torch.manual_seed(0)
    a, b, x = nn.Linear(4, 4), nn.Linear(4, 4), torch.randn(2, 4)
    calls = []

    def region(value: torch.Tensor) -> torch.Tensor:
        calls.append(len(calls))
        return torch.tanh(a(value)).sum() + torch.tanh(b(value)).sum()

    expected = torch.autograd.grad(region(x), [a.weight, b.weight])
    for stage_class, recomputations in ((_PerGroupWeightPass, 2), (_RecomputingOnce, 1)):
        calls.clear()
        loss = torch.utils.checkpoint.checkpoint(region, x, use_reentrant=False)
        grads = stage_class(loss, [a, b]).backward_weight_one_chunk(0)
        assert len(calls) == 1 + recomputations
        for grad, reference in zip(grads, expected):
            torch.testing.assert_close(grad, reference)
