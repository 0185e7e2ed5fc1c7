"""What would break first on CUDA + NCCL, shown on a CPU (issue 16): the module's device after
``model_to_device``, tensors handed to collectives on the group's device, no host sync on the
schedule's micro-batch indices."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.distributed as dist

from lightning_rannc import RaNNCStrategy
from lightning_rannc.runtime.optim import clip_grad_norm
from lightning_rannc.runtime.pipeline import microbatch_indices

from helpers.cases import QUIET
from helpers.models import LoggingMLP, table_loader


def test_the_module_reports_the_strategys_device_after_model_to_device() -> None:
    """On a GPU the module kept reporting the CPU it was built on, so `torch.arange(n,
    device=self.device)` in a step mixed devices. The meta device stands in for a GPU here."""
    strategy = RaNNCStrategy(parallel_devices=[torch.device("meta")])
    model = LoggingMLP()
    assert model.device.type == "cpu"
    strategy.model = model
    strategy.model_to_device()
    assert model.device == torch.device("meta")
    assert all(p.is_meta for p in model.parameters())


def test_the_gradient_norm_sum_goes_to_the_collective_on_the_groups_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank holding no gradients built its sum on the CPU, which NCCL refuses."""
    seen: list[torch.device] = []
    record = lambda tensor, group=None: seen.append(tensor.device)  # noqa: E731
    fake = SimpleNamespace(is_initialized=lambda: True, all_reduce=record)
    monkeypatch.setattr("lightning_rannc.runtime.optim.dist", fake)
    norm = clip_grad_norm([], [], 1.0, group=None, device=torch.device("meta"))
    assert seen == [torch.device("meta")] and norm.device == torch.device("meta")


def test_the_schedules_micro_batch_indices_are_read_without_waiting_for_the_device() -> None:
    indices = microbatch_indices(4)
    assert indices.device.type == "cpu" and indices.tolist() == [0, 1, 2, 3]


class TinyLossMLP(LoggingMLP):
    """A loss so small that its gradients underflow in fp16 unless scaled."""

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx)["loss"] * 1e-6


def test_verify_under_fp16_loss_scaling_scales_the_unpartitioned_step_too() -> None:
    """Without the scale, the reference's fp16 gradients underflowed to zero and verify called
    that a partitioning error."""
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    strategy = RaNNCStrategy(micro_batches=2, verify=True, verify_tolerance=5e-2)
    fp16 = MixedPrecision("16-mixed", "cpu", scaler)
    trainer = L.Trainer(**{**QUIET, "max_steps": 1}, strategy=strategy, plugins=[fp16])
    trainer.fit(TinyLossMLP(), table_loader())  # raises RuntimeSetupError if the gradients differ
    if dist.is_initialized():
        dist.destroy_process_group()


def test_the_cuda_limit_is_what_the_allocator_holds_or_can_get(monkeypatch: pytest.MonkeyPatch) -> None:
    """The limit was the device's total memory, so the CUDA context, NCCL's communicators and
    other processes were planned as free."""
    from lightning_rannc.integration.layout import NCCL_P2P_BYTES_PER_PEER, usable_cuda_memory

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 * gib)
    device = torch.device("cuda", 0)
    assert usable_cuda_memory(device, pipelined=False) == 65 * gib
    assert usable_cuda_memory(device, pipelined=True) == 65 * gib - 2 * NCCL_P2P_BYTES_PER_PEER


def test_gradient_accumulation_keeps_the_earlier_batches_gradients_beside_the_schedule() -> None:
    """With ``accumulate_grad_batches`` > 1 the runtime holds the window's gradients aside while
    the schedule makes new ones: one more copy of the trainable bytes at the backward's peak,
    none at the optimizer step (which sees the sum)."""
    from lightning_rannc.integration.layout import engine_options
    from lightning_rannc.plan.memory import stage_memory

    common = dict(
        param_bytes=1000, trainable_bytes=1000, activation_bytes=5000, input_bytes=0, output_bytes=0,
        in_flight=1, num_microbatches=1, checkpoint=False, optimizer_factor=2.0,
    )  # fmt: skip
    plain = stage_memory(**common)  # type: ignore[arg-type]
    accumulating = stage_memory(**common, accumulating=True)  # type: ignore[arg-type]
    assert accumulating.total == plain.total + 1000
    assert (accumulating.optimizer, accumulating.params) == (plain.optimizer, plain.params)
    # The Trainer's setting reaches the plan's memory model.
    for window, expected in ((1, False), (4, True)):
        module = LoggingMLP()
        trainer = L.Trainer(strategy=RaNNCStrategy(), accumulate_grad_batches=window, logger=False)
        trainer.strategy.connect(module)
        module.trainer = trainer
        assert engine_options(trainer.strategy, None, optimizer="sgd").accumulating is expected


def test_the_memory_model_counts_receive_buffers_of_the_micro_batches_in_flight() -> None:
    """Receive buffers hold memory from their receive to their backward (``_compat``'s
    ``_ReceiveBuffersOnDemand``): inputs of the micro-batches in flight and one ahead, two
    output gradients (zero bubble: as many as are in flight); DDP's buckets are the gradients
    themselves (bucket views)."""
    from lightning_rannc.plan.memory import stage_memory

    common = dict(
        param_bytes=1000,
        trainable_bytes=1000,
        activation_bytes=500,
        input_bytes=10,
        output_bytes=20,
        in_flight=2,
        checkpoint=False,
        optimizer_factor=2.0,
    )
    one = stage_memory(**common, num_microbatches=8)  # type: ignore[arg-type]
    assert one.buffers == 3 * 10 + 2 * 20 + 2 * 20
    assert stage_memory(**common, num_microbatches=8, zero_bubble=True).buffers == one.buffers  # type: ignore[arg-type]
    gpipe = stage_memory(**{**common, "in_flight": 8}, num_microbatches=8)  # type: ignore[arg-type]
    assert gpipe.buffers == 8 * 10 + 2 * 20 + 8 * 20
    assert stage_memory(**{**common, "in_flight": 8}, num_microbatches=8, zero_bubble=True).buffers == 8 * (
        10 + 20 + 20
    )  # type: ignore[arg-type]
    replicated = stage_memory(**common, num_microbatches=8, num_replicas=4)  # type: ignore[arg-type]
    assert replicated.buffers == one.buffers
    checkpointed = stage_memory(**{**common, "checkpoint": True}, num_microbatches=8)  # type: ignore[arg-type]
    assert checkpointed.activations == 500  # the kept inputs are the receive buffers, counted once


@pytest.mark.compat
def test_a_stage_keeps_no_example_tensor_of_a_micro_batch(tmp_path) -> None:
    """The examples a stage is built with give shapes and dtypes only: torch 2.11 kept the
    tensors themselves for the stage's life, a micro-batch's inputs and outputs on the device
    all through training that no plan counts (``benchmarks/memory.py`` saw them at every peak)."""
    import gc
    import weakref
    from datetime import timedelta

    from lightning_rannc._compat import PipelineStageClass

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=30))
    example_in = torch.empty(2, 8, requires_grad=True)
    example_out = torch.empty(2, 4)
    kept = [weakref.ref(example_in), weakref.ref(example_out)]
    stage = PipelineStageClass(
        torch.nn.Linear(8, 4), 0, 1, torch.device("cpu"), input_args=(example_in,), output_args=(example_out,)
    )
    del example_in, example_out
    gc.collect()
    assert [ref() for ref in kept] == [None, None]
    assert stage.stage_index == 0
