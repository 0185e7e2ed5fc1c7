"""``RaNNCStrategy``: Lightning's hooks, delegating the work to ``integration`` and ``runtime``.

The hooks live in ``RaNNCStrategyMixin`` so that the same code serves ``lightning.pytorch``
and the standalone ``pytorch_lightning`` package, whose Strategy base classes differ.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import time
from collections.abc import Generator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import ParallelStrategy
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_rannc import _compat
from lightning_rannc._utils import _configure_logger
from lightning_rannc.capture.batch import FlatBatch
from lightning_rannc.config import RaNNCConfig, option_docs, strategy_docstring
from lightning_rannc.integration import checkpoints, precision
from lightning_rannc.integration import layout as at_setup
from lightning_rannc.integration.evaluation import EvaluationLoops, batch_and_index
from lightning_rannc.profile.cache import ProfileCache
from lightning_rannc.runtime import mesh
from lightning_rannc.runtime.engine import PipelineEngine
from lightning_rannc.runtime.planning import Layout
from lightning_rannc.runtime.trace import EventTrace
from lightning_rannc.runtime.watchdog import Watchdog, watched_step

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["RaNNCStrategy"]

log = logging.getLogger("lightning_rannc")

_SUPPORTED_PRECISION = ("32-true", "64-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true")


if TYPE_CHECKING:
    _MixinBase = ParallelStrategy  # type checkers see the hooks the mixin overrides
else:
    _MixinBase = object


class RaNNCStrategyMixin(_MixinBase):
    """Everything of ``RaNNCStrategy`` except its Lightning base class."""

    strategy_name = "rannc"
    lightning_package = "lightning.pytorch"
    """The Lightning package whose Trainer uses the strategy (``pytorch_lightning`` has its own)."""

    # RaNNCConfig's options (a test keeps them equal), spelt out for LightningCLI and type checkers.
    def __init__(
        self,
        pipeline_stages: int | str | None = "auto",
        micro_batches: int | str = "auto",
        max_micro_batches: int = 64,
        min_micro_batch_size: int = 1,
        schedule: str = "auto",
        virtual_stages: int | str = "auto",
        zero_bubble: bool | str = "auto",
        zero_stage: int | str = "auto",
        offload_optimizer: bool | str = "auto",
        activation_checkpointing: bool | str = "auto",
        memory_limit: int | str | None = None,
        memory_margin: float = 0.1,
        device_preset: str | None = None,
        deployment: str | None = None,
        state_dict_type: str = "full",
        profile_cache: str | None = None,
        measure_links: bool = True,
        max_blocks: int = 128,
        profile_repeats: int = 3,
        trace: str | None = None,
        trace_steps: int = 5,
        verify: bool = False,
        verify_tolerance: float = 1e-3,
        terminate_on_nan: bool = False,
        pipelined_evaluation: bool = True,
        fault_timeout: float = 60.0,
        stall_timeout: float | None = None,
        process_group_backend: str | None = None,
        timeout: float = 1800.0,
        start_method: str = "popen",
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
    ) -> None:
        given = locals()
        lightning = ("accelerator", "parallel_devices", "cluster_environment", "checkpoint_io", "precision_plugin")
        super().__init__(**{name: given[name] for name in lightning})  # type: ignore[call-arg]
        options = {f.name: given[f.name] for f in dataclasses.fields(RaNNCConfig)}
        self.config = RaNNCConfig(**options).with_env_overrides()
        self.block_costs = ProfileCache(self.config.profile_cache)
        self.engine: PipelineEngine | None = None  # the pipelined training step, made at setup
        self._chosen_stages: int | None = None
        self.watchdog: Watchdog | None = None
        self._trace: EventTrace | None = None
        self._closure_end = 0.0
        self._num_nodes = 1
        self._groups: mesh.ProcessGroups | None = None
        self._evaluation = EvaluationLoops()
        _configure_logger()

    def __getattr__(self, name: str) -> Any:
        # Every option reads as an attribute too (`trainer.strategy.micro_batches`), from the config.
        config = self.__dict__.get("config")
        if config is not None and name in option_docs():
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # --- Lightning's view of the world ------------------------------------------------------

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def is_distributed(self) -> bool:
        return True

    @property
    def layout(self) -> Layout:
        """Stages per pipeline (S) and replicas (D): as given, as chosen at setup (``"auto"``),
        or one pipeline over all ranks."""
        stages = self.config.pipeline_stages
        stages = stages if isinstance(stages, int) else self._chosen_stages or self.world_size
        return Layout(stages, max(1, self.world_size // stages), "")

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Every stage of a pipeline reads the same batch: shard the data over replicas only.
        shape = self.layout
        return {"num_replicas": shape.num_replicas, "rank": self.global_rank // shape.pipeline_stages}

    @property
    def plan(self) -> Any:
        """The ``PartitionPlan`` in use (``None`` before the first training batch)."""
        pipeline = self.engine.pipeline if self.engine is not None else None
        return pipeline.plan if pipeline is not None else None

    # --- processes ----------------------------------------------------------------------

    @override
    def _configure_launcher(self) -> None:
        self._launcher = _compat.build_launcher(self, self.lightning_package, self.config.start_method)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()  # type: ignore[misc]
        reset_seed()
        self.set_world_ranks()
        config = self.config
        backend = config.process_group_backend or _compat.default_process_group_backend(self.root_device)
        assert self.cluster_environment is not None
        _compat.start_process_group(self.cluster_environment, backend, config.timeout, self.root_device)
        atexit.register(mesh.destroy_process_group_at_exit)
        if self.world_size > 1 and self.watchdog is None:
            rank, size, store = self.global_rank, self.world_size, _compat.rendezvous_store()
            self.watchdog = Watchdog(store, rank, size, config.fault_timeout, config.stall_timeout)
            self.watchdog.start()

    @override
    def on_exception(self, exception: BaseException) -> None:
        # On the rank that raised: the watchdog stops the others, this rank's NCCL groups are aborted.
        mesh.note_failure()
        if self.watchdog is not None:
            self.watchdog.report_failure(exception)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero = __import__(f"{self.lightning_package}.utilities.rank_zero", fromlist=["rank_zero_only"])
        rank_zero.rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank  # type: ignore[attr-defined]

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        at_setup.check_trainer(self, trainer, _SUPPORTED_PRECISION)
        assert self.accelerator is not None and self.model is not None
        precision.install(self)
        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        device = at_setup.measured_device(self, trainer)
        chosen = at_setup.choose_pipeline_stages(self, trainer, device)  # before the optimizers
        self._chosen_stages = chosen or self._chosen_stages  # validate/test after fit keep fit's choice
        if trainer.state.fn == "fit":
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == "fit":
            _compat.optimizers_to_device(self.optimizers, self.root_device)
        shape = self.layout
        self._groups = mesh.build_process_groups(
            shape.pipeline_stages, shape.num_replicas, self.global_rank, self.root_device
        )
        if trainer.state.fn != "fit" and self.engine is not None and self.engine.serves(self.lightning_module, shape):
            self.engine.rebind(self._groups)  # evaluate with the parameters where training put them
            return
        if self.config.trace is not None and trainer.state.fn == "fit":
            at_setup.check_trace_path(self, self.config.trace)
            self._trace = EventTrace(self.global_rank, self.config.trace_steps, self.root_device)
        self.engine = at_setup.build_engine(self, device, self._groups, self._trace)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        _compat.move_to_device(self.model, self.root_device)  # tensors on the meta device stay there

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        """``init_module(empty_init=True)`` builds on the meta device (``runtime/initialize.py``)."""
        if not empty_init:
            with super().tensor_init_context(empty_init):  # type: ignore[misc]
                yield
            return
        with torch.device("meta"), self.precision_plugin.tensor_init_context():
            yield

    @contextmanager
    @override
    def model_sharded_context(self) -> Generator[None, None, None]:
        with torch.device("meta"):  # `configure_model()` too builds on the meta device
            yield

    # --- the training step ----------------------------------------------------------------

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch, batch_idx = batch_and_index(args, kwargs)
        engine = self.engine
        assert engine is not None, "training_step before setup"
        scale = precision.loss_scale(self)
        # Capture, profile, run under the precision's context: the graph knows its run-time dtypes.
        with self.precision_plugin.train_step_context():
            flat = FlatBatch.of(self.precision_plugin.convert_input(batch), engine.where)  # the one flattening
            pipeline = engine.pipeline or engine.build(flat, self.optimizers, batch_idx, scale)
            with watched_step(self.watchdog, f"training step {batch_idx}"):
                values = pipeline.run(flat, batch_idx, loss_scale=scale)
        if self.config.terminate_on_nan:
            pipeline.check_finite(values[0], batch_idx)
        pipeline.replay_logs(values)
        return pipeline.step_output(values)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        # The schedule already ran backward inside training_step; here the held gradients are added,
        # around the same hooks Lightning fires for a normal backward.
        assert self.engine is not None and self.engine.pipeline is not None and self.lightning_module is not None
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        self.engine.pipeline.accumulate_grads(1.0 / self.lightning_module.trainer.accumulate_grad_batches)
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        self._closure_end = time.perf_counter()
        return closure_loss

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._trace is not None:  # the closure (the step itself) ended in `backward`
            self._trace.interval("optimizer step", "optimizer", self._closure_end, time.perf_counter())
        if self.engine is not None and self.engine.pipeline is not None:
            self.engine.pipeline.after_optimizer_step()
        return output

    # --- evaluation: forward only through the pipeline ---------------------------------------

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        context, whole = self.precision_plugin.val_step_context, super().validation_step
        return self._evaluation.step(self, "validation_step", context, whole, args, kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        context, whole = self.precision_plugin.test_step_context, super().test_step
        return self._evaluation.step(self, "test_step", context, whole, args, kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        context, whole = self.precision_plugin.predict_step_context, super().predict_step
        return self._evaluation.step(self, "predict_step", context, whole, args, kwargs)

    @override
    def on_validation_start(self) -> None:
        self._evaluation.start(self)

    @override
    def on_validation_end(self) -> None:
        self._evaluation.end(self)

    on_test_start = on_predict_start = on_validation_start
    on_test_end = on_predict_end = on_validation_end

    @override
    def on_train_start(self) -> None:
        at_setup.note_training_epoch(self)  # before the first batch, where the engine plans

    @override
    def on_train_end(self) -> None:
        if self._trace is not None and self.config.trace is not None:
            self._trace.write(self.config.trace, self._groups.cpu_group if self._groups is not None else None)
            if self.is_global_zero:
                log.info("wrote the runtime trace %s", self.config.trace)
            self._trace = None
        # A module built on the meta device may not fit one device: it stays partitioned.
        if self.engine is not None and self.engine.pipeline is not None and not self.engine.from_meta:
            self.engine.pipeline.materialize()

    # --- checkpoints ----------------------------------------------------------------------

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = checkpoints.module_state(self)
        return super().lightning_module_state_dict() if state is None else state  # type: ignore[misc]

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Tensor]:
        state = checkpoints.optimizer_state(self, optimizer)
        return super().optimizer_state(_compat.optimizer_of(optimizer)) if state is None else state  # type: ignore[misc]

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not checkpoints.save(self, checkpoint, filepath):
            super().save_checkpoint(checkpoint, filepath, storage_options)  # type: ignore[misc]

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if not checkpoints.load_module_state(self, checkpoint, strict):
            super().load_model_state_dict(checkpoint, strict)  # type: ignore[misc]

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if not checkpoints.load_optimizer_states(self, checkpoint):
            super().load_optimizer_state_dict(checkpoint)  # type: ignore[misc]

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        full, module = super().load_checkpoint, self.lightning_module  # type: ignore[misc]
        return dict(checkpoints.load(checkpoint_path, lambda path: full(path, weights_only), module, weights_only))

    # --- collectives --------------------------------------------------------------------

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if _compat.distributed_is_initialized():
            mesh.barrier(self.root_device)

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _compat.distributed_is_initialized():
            return obj
        payload = [obj]
        dist.broadcast_object_list(payload, src, group=self._groups.cpu_group if self._groups is not None else None)
        return payload[0]

    @override
    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        # A pipeline's ranks hold the same values: `sync_dist` reduces over replicas, as with DDP.
        if not isinstance(tensor, Tensor) or not _compat.distributed_is_initialized():
            return tensor
        if group is None:
            if self._groups is None or self.layout.num_replicas == 1:
                return tensor
            group = self._groups.dp_group
        return _compat.sync_ddp_if_available(tensor, group, reduce_op=reduce_op)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        value = torch.tensor(int(decision), device=self.root_device)
        if _compat.distributed_is_initialized():
            dist.all_reduce(value)
        return bool(value == self.world_size) if all else bool(value)

    @override
    def all_gather(self, tensor: Tensor, group: Any = None, sync_grads: bool = False) -> Tensor:
        return _compat.all_gather_ddp_if_available(tensor, group=group, sync_grads=sync_grads)

    @override
    def teardown(self) -> None:
        if self.engine is not None:
            self.engine.restore_metric_groups()
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        if self._groups is not None:
            self._groups.destroy()
            self._groups = None
        if self.cluster_environment is not None:
            self.cluster_environment.teardown()
        _compat.optimizers_to_device(self.optimizers, torch.device("cpu"))
        if self.lightning_module is not None and self.root_device.type != "cpu":
            _compat.move_to_device(self.lightning_module, torch.device("cpu"))
        self.precision_plugin.teardown()
        if self.accelerator is not None:
            self.accelerator.teardown()
        self.checkpoint_io.teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        description = "Automatic pipeline partitioning of the training step (lightning_rannc)"
        strategy_registry.register(cls.strategy_name, cls, description=description, override=True)


RaNNCStrategyMixin.__init__.__doc__ = strategy_docstring()


class RaNNCStrategy(RaNNCStrategyMixin, ParallelStrategy):
    """Trains an unmodified LightningModule split into pipeline stages across processes.

    The training step is captured with ``torch.export`` at the first batch, profiled, split into
    stages that balance the profiled time, and run micro-batched with
    ``torch.distributed.pipelining``. Example::

        import lightning as L
        import lightning_rannc  # registers "rannc"

        trainer = L.Trainer(strategy="rannc", accelerator="cpu", devices=2, max_steps=20)
        trainer.fit(MyLightningModule(), datamodule)
    """
