"""Setup-time choices: the device description, the stages x replicas layout, the engine's options.

The layout must be known inside ``setup``, before the optimizers: ``configure_optimizers`` may
read ``trainer.estimated_stepping_batches``, which makes Lightning shard the data loaders with
``distributed_sampler_kwargs``, which depend on the replica count. So with
``pipeline_stages="auto"`` rank 0 plans every layout on a sample batch here, and every rank
takes its choice (or raises its error).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from lightning_rannc._compat import attached_trainer, evaluation_data_source, optimizer_of, training_data_source
from lightning_rannc._utils import optimizer_kind
from lightning_rannc.capture.batch import FlatBatch
from lightning_rannc.capture.module_state import has_meta_tensors
from lightning_rannc.errors import CaptureError, RuntimeSetupError
from lightning_rannc.integration import precision
from lightning_rannc.plan.devices import DeviceSpec, get_device, parse_bytes
from lightning_rannc.runtime.agreement import decided_on_rank_zero
from lightning_rannc.runtime.engine import PipelineEngine
from lightning_rannc.runtime.links import apply_links, measure_links
from lightning_rannc.runtime.mesh import ProcessGroups
from lightning_rannc.runtime.planning import EngineOptions, Layout, choose_layout
from lightning_rannc.runtime.trace import EventTrace

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_rannc.strategy import RaNNCStrategyMixin as RaNNCStrategy

__all__ = [
    "device_preset",
    "measured_device",
    "engine_options",
    "choose_pipeline_stages",
    "check_trainer",
    "check_trace_path",
    "epoch_samples",
    "note_training_epoch",
]

log = logging.getLogger("lightning_rannc")


def device_preset(device: torch.device) -> str:
    """The preset closest to ``device`` (an unknown GPU is planned as an H100)."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return next((preset for preset in ("h100", "a100", "v100") if preset in name), "h100")


def measured_device(strategy: RaNNCStrategy, trainer: pl.Trainer) -> DeviceSpec | None:
    """The device preset with measured link bandwidths (collective, ``fit`` only); ``None``: the preset."""
    config = strategy.config
    if not config.measure_links or strategy.world_size == 1 or trainer.state.fn != "fit":
        return None
    links = measure_links(strategy.root_device, local_world_size=strategy.num_processes)
    if strategy.is_global_zero:
        log.info(links.describe())
    return apply_links(get_device(config.device_preset or device_preset(strategy.root_device)), links)


def engine_options(strategy: RaNNCStrategy, device: DeviceSpec | None, optimizer: str | None = None) -> EngineOptions:
    """The options and what setup resolved, for the engine and the layout search."""
    optimizers = strategy.optimizers
    if optimizer is None:
        optimizer = optimizer_kind(optimizer_of(optimizers[0])) if optimizers else "sgd"
    config = strategy.config
    preset = get_device(config.device_preset or device_preset(strategy.root_device))
    trainer = attached_trainer(strategy.lightning_module)
    return EngineOptions(
        config=config,
        pipeline_stages=strategy.layout.pipeline_stages,
        num_replicas=strategy.layout.num_replicas,
        device=device or preset,
        devices_per_node=strategy.num_processes,
        optimizer=optimizer,
        memory_limit=_memory_limit(strategy),
        accumulating=trainer is not None and trainer.accumulate_grad_batches > 1,
        loss_scaling=getattr(strategy.precision_plugin, "scaler", None) is not None,
        precision=str(strategy.precision_plugin.precision),
    )


def build_engine(
    strategy: RaNNCStrategy, device: DeviceSpec | None, groups: ProcessGroups, trace: EventTrace | None
) -> PipelineEngine:
    """The engine for the strategy's module, with the options and layout setup resolved."""
    module = strategy.lightning_module
    assert module is not None
    options = engine_options(strategy, device)
    return PipelineEngine(
        module, options, strategy.global_rank, strategy.root_device, groups, strategy.block_costs, trace
    )


NCCL_P2P_BYTES_PER_PEER = 64 * 2**20
"""Device memory NCCL takes for point-to-point transfers with one peer, an estimate: its
buffers (``NCCL_BUFFSIZE``, 4 MiB by default) over several channels, allocated at the first send
to that peer, after the limit is read. ``benchmarks/gpu_check.py`` measures the whole."""


def _memory_limit(strategy: RaNNCStrategy) -> int | None:
    if strategy.config.memory_limit is not None:
        return parse_bytes(strategy.config.memory_limit)
    if strategy.root_device.type == "cuda":
        return usable_cuda_memory(strategy.root_device, strategy.layout.pipeline_stages > 1)
    return None


def usable_cuda_memory(device: torch.device, pipelined: bool) -> int:
    """Bytes the plan may fill on ``device``: what the caching allocator holds or can still get.

    Not the device's total: the CUDA context, NCCL's communicators (the process groups are
    created and warmed up before the engine reads this) and other processes already hold part
    of it, outside PyTorch's allocator. Point-to-point buffers come later: ``pipelined`` stages
    keep some for each neighbour. Fragmentation is left to the margin (``memory_margin``).
    """
    free, _ = torch.cuda.mem_get_info(device)
    usable = free + torch.cuda.memory_reserved(device)
    return usable - (2 * NCCL_P2P_BYTES_PER_PEER if pipelined else 0)


def choose_pipeline_stages(strategy: RaNNCStrategy, trainer: pl.Trainer, device: DeviceSpec | None) -> int | None:
    """``pipeline_stages="auto"``: the stage count rank 0 finds best on a sample batch, on every
    rank (1 for evaluation on a fresh Trainer); ``None`` when nothing is to be chosen. The
    optimizers do not exist yet: their state is sized as Adam's (two moments), the most common
    and the larger. Collective."""
    if strategy.config.pipeline_stages != "auto" or strategy.world_size == 1:
        return None
    if trainer.state.fn != "fit":
        # After a fit its choice stands. Before any (a fresh Trainer), every rank holds the whole
        # module and runs evaluation steps as Lightning does: shard the data over every rank, as ddp;
        # a module created on the meta device is planned, as for fit, from an evaluation batch.
        trained = strategy.engine is not None and strategy.engine.pipeline is not None
        if trained or not has_meta_tensors(strategy.lightning_module):
            return None if trained else 1
    options = engine_options(strategy, device, optimizer="adamw")
    # over the default group: the mesh and its CPU group wait on this answer (a few numbers)
    layout = decided_on_rank_zero(lambda: _best_layout(strategy, trainer, options), strategy.global_rank)
    if strategy.is_global_zero:
        log.info(layout.summary)
    return layout.pipeline_stages


def _best_layout(strategy: RaNNCStrategy, trainer: pl.Trainer, options: EngineOptions) -> Layout:
    batch, epoch = _sample_batch(strategy, trainer)
    options = dataclasses.replace(options, epoch_samples=epoch)
    world = strategy.world_size
    if batch is None:
        return Layout(world, 1, "layout: no training batch to plan from; one pipeline over all devices")
    module = strategy.lightning_module
    assert module is not None
    with strategy.precision_plugin.train_step_context():
        return choose_layout(module, batch, options, world, strategy.root_device, strategy.block_costs)


def build_for_evaluation(strategy: RaNNCStrategy, trainer: pl.Trainer) -> None:
    """Build the pipeline of a module created on the meta device before its first evaluation
    (the sanity check, or ``validate``/``test``/``predict`` on a fresh Trainer): it cannot run
    whole. It is planned from ``training_step``, as for ``fit``, on the first training batch, or
    without ``fit`` on the first batch of the evaluation data. Collective."""
    engine = strategy.engine
    assert engine is not None
    fit = trainer.state.fn == "fit"
    batch, epoch = _sample_batch(strategy, trainer)
    engine.options = dataclasses.replace(engine.options, epoch_samples=epoch if fit else 0)
    data = "training" if fit else "evaluation"
    if batch is None:
        raise RuntimeSetupError(
            f"{type(engine.module).__name__} was created on the meta device: it is evaluated through a pipeline "
            f"planned from `training_step` ({engine.where}) on the first {data} batch, but there is none."
        )
    # `validate`/`test`/`predict` run under inference mode (except on gloo): the stages' tensors
    # made here must be ordinary ones, which training can use later.
    with torch.inference_mode(False), torch.enable_grad(), strategy.precision_plugin.train_step_context():
        flat = FlatBatch.of(batch, engine.where)
        flat = flat.with_leaves([leaf.clone() if leaf.is_inference() else leaf for leaf in flat.leaves])
        try:
            engine.build(flat, strategy.optimizers if fit else [], 0, precision.loss_scale(strategy), fit=fit)
        except CaptureError as error:
            if fit:
                raise
            called = getattr(trainer.state.fn, "value", trainer.state.fn)  # "validate", "test", "predict"
            raise CaptureError(
                f"{type(engine.module).__name__} was created on the meta device: `{called}` on a "
                "Trainer that did not fit plans its pipeline from `training_step` on the first evaluation batch, "
                f"which `training_step` does not take ({error}). Give evaluation batches that `training_step` "
                "takes, or evaluate with the Trainer that ran `fit`."
            ) from error


def _sample_batch(strategy: RaNNCStrategy, trainer: pl.Trainer) -> tuple[Any, int | None]:
    """The first training batch (without ``fit``, evaluation batch) as the step will get it,
    without disturbing the run (the shuffling sampler draws from the global RNG), and the
    loaders' ``epoch_samples`` (before Lightning deals them over the replicas)."""
    source = training_data_source(trainer) if trainer.state.fn == "fit" else evaluation_data_source(trainer)
    if (trainer.state.fn == "fit" and trainer.limit_train_batches == 0) or not source.is_defined():
        return None, None
    combined_loader = importlib.import_module(f"{strategy.lightning_package}.utilities").CombinedLoader
    with torch.random.fork_rng(devices=[]):  # the user's transfer hooks may draw random numbers too
        loaders = source.dataloader()
        combined = loaders if isinstance(loaders, combined_loader) else combined_loader(loaders, "max_size_cycle")
        batch = next(iter(combined), None)
        if batch is None:
            return None, None
        epoch = epoch_samples(combined.iterables, replicas=1)
        return strategy.precision_plugin.convert_input(strategy.batch_to_device(batch[0])), epoch


def epoch_samples(loaders: Any, replicas: int) -> int | None:
    """``SearchSettings.epoch_samples`` of training ``loaders`` that deal ``replicas`` replicas
    each a share (``len(sampler)`` samples, as Lightning's distributed sampler does): the
    epoch's samples where its last batch may be smaller, 0 when every batch is full
    (``drop_last``), ``None`` when the loaders do not tell (several loaders, an iterable
    dataset, a batch sampler of the user's own)."""
    if not isinstance(loaders, DataLoader) or loaders.batch_size is None:
        return None
    if loaders.drop_last:
        return 0
    try:
        return len(loaders.sampler) * replicas  # type: ignore[arg-type]
    except TypeError:  # a sampler without a length
        return None


def note_training_epoch(strategy: RaNNCStrategy) -> None:
    """Before the first training batch, which the engine plans at: the batch sizes of the epoch,
    from the data loaders as Lightning dealt them over the replicas."""
    engine, trainer = strategy.engine, attached_trainer(strategy.lightning_module)
    if engine is None or engine.pipeline is not None or trainer is None:
        return
    epoch = epoch_samples(trainer.train_dataloader, strategy.layout.num_replicas)
    engine.options = dataclasses.replace(engine.options, epoch_samples=epoch)


def check_trainer(strategy: RaNNCStrategy, trainer: pl.Trainer, supported_precision: tuple[str, ...]) -> None:
    """Refuse, at setup and on every rank, what the strategy cannot run."""
    name, stages, world = type(strategy).__name__, strategy.layout.pipeline_stages, strategy.world_size
    if world % stages:
        raise RuntimeSetupError(
            f"{name}(pipeline_stages={stages}) needs a multiple of {stages} processes (one pipeline "
            f"per replica), but the Trainer has {world} (devices x num_nodes): change "
            "pipeline_stages or the number of devices."
        )
    if not trainer.lightning_module.automatic_optimization:
        raise RuntimeSetupError(
            f"{name} runs the pipelined step for you, so it needs automatic optimization; "
            f"{type(trainer.lightning_module).__name__} sets `automatic_optimization = False`."
        )
    if str(trainer.precision) not in supported_precision:
        raise RuntimeSetupError(
            f"{name} supports precision={list(supported_precision)} so far; got "
            f"Trainer(precision={trainer.precision!r})."
        )


def check_trace_path(strategy: RaNNCStrategy, path: str) -> None:
    """Rank 0 writes the trace after training: a path it cannot write fails now, everywhere."""
    missing = strategy.broadcast(not Path(path).resolve().parent.is_dir() if strategy.global_rank == 0 else None)
    if missing:
        raise RuntimeSetupError(
            f"{type(strategy).__name__}(trace={path!r}): the folder {str(Path(path).parent)!r} does not exist on "
            "rank 0; create it or choose another path."
        )
