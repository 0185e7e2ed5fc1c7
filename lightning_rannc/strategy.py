"""``RaNNCStrategy``: Lightning's hooks, delegating the pipeline work to ``PipelineEngine``.

The hooks live in ``_RaNNCStrategyMixin`` so that the same code serves ``lightning.pytorch``
and the standalone ``pytorch_lightning`` package, whose Strategy base classes differ.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import importlib
import logging
import time
from collections.abc import Generator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import (
    _all_gather_ddp_if_available,
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import ParallelStrategy
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_rannc._utils import _configure_logger, optimizer_kind
from lightning_rannc.config import RaNNCConfig
from lightning_rannc.errors import RuntimeSetupError
from lightning_rannc.plan.devices import DeviceSpec, get_device, parse_bytes
from lightning_rannc.profile.cache import ProfileCache
from lightning_rannc.runtime.checkpoint import integer_state_keys, is_sharded, load_sharded, save_sharded
from lightning_rannc.runtime.engine import NotPipelined, PipelineEngine
from lightning_rannc.runtime.links import apply_links, measure_links
from lightning_rannc.runtime.mesh import ProcessGroups, build_process_groups
from lightning_rannc.runtime.planning import EngineOptions, Layout, choose_layout
from lightning_rannc.runtime.trace import EventTrace
from lightning_rannc.runtime.watchdog import Watchdog

__all__ = ["RaNNCStrategy"]

log = logging.getLogger("lightning_rannc")

_SUPPORTED_PRECISION = ("32-true", "64-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true")


if TYPE_CHECKING:
    _MixinBase = ParallelStrategy  # type checkers see the hooks the mixin overrides
else:
    _MixinBase = object


class _RaNNCStrategyMixin(_MixinBase):
    """Everything of ``RaNNCStrategy`` except its Lightning base class."""

    strategy_name = "rannc"
    _namespace = "lightning.pytorch"

    def __init__(
        self,
        pipeline_stages: int | str | None = "auto",
        micro_batches: int | str = 4,
        max_micro_batches: int = 64,
        min_micro_batch_size: int = 1,
        schedule: str = "auto",
        virtual_stages: int = 1,
        activation_checkpointing: bool | str = False,
        memory_limit: int | str | None = None,
        memory_margin: float = 0.1,
        device_preset: str | None = None,
        max_blocks: int = 64,
        profile_repeats: int = 3,
        deployment: str | None = None,
        state_dict_type: str = "full",
        profile_cache: str | None = None,
        measure_links: bool = True,
        trace: str | None = None,
        trace_steps: int = 5,
        verify: bool = False,
        verify_tolerance: float = 1e-3,
        terminate_on_nan: bool = False,
        pipelined_evaluation: bool = True,
        zero_bubble: bool = False,
        fault_timeout: float = 60.0,
        process_group_backend: str | None = None,
        timeout: float = 1800.0,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
    ) -> None:
        """Pipeline-parallel training of an unmodified LightningModule.

        Args:
            pipeline_stages: ranks per pipeline (S); the devices are split into ``devices / S``
                data-parallel replicas of the pipeline. ``"auto"``: the planner picks the layout with
                the most samples per second that fits ``memory_limit``, from the first training
                batch (profiled on rank 0 at setup). ``None``: every device is one stage.
            micro_batches: micro-batches per batch; a batch that it does not divide runs with the
                nearest count that does. ``"auto"``: the planner picks it (a divisor of the batch).
            max_micro_batches: with ``micro_batches="auto"``, the most micro-batches it may pick.
            min_micro_batch_size: with ``micro_batches="auto"``, the fewest samples per micro-batch.
            schedule: ``"auto"``, ``"gpipe"``, ``"1f1b"`` or ``"interleaved_1f1b"``; ``"auto"`` takes
                1F1B when there are at least as many micro-batches as stages, else GPipe.
            virtual_stages: stages per rank for ``"interleaved_1f1b"`` (V).
            activation_checkpointing: recompute every stage's activations in backward instead of
                keeping them for all micro-batches in flight (``torch.utils.checkpoint``,
                non-reentrant; dropout masks are the same in the recomputation). ``"auto"``: only
                the stages that do not fit ``memory_limit`` otherwise.
            memory_limit: bytes per device the plan may use (``"80GB"``, ``"16GiB"`` or an int);
                ``None``: the CUDA device's total memory, no limit on CPU. A layout that cannot
                fit raises an error naming the device count or memory that would.
            memory_margin: share of ``memory_limit`` kept free (allocator, temporary buffers).
            device_preset: ``"h100"``, ``"a100"``, ``"v100"`` or ``"cpu"``: link bandwidths for the
                plan's predictions, and FLOP rates for modules on the meta device (which cannot be
                profiled). ``None``: from the device's name.
            max_blocks: the graph is grouped into at most this many blocks before profiling;
                stages are cut only between blocks.
            profile_repeats: timed repetitions per block when profiling.
            deployment: path of a plan file (RaNNC's deployment). If it exists it is used without
                profiling or search (and refused if it was made for another graph, layout or
                batch size); otherwise the new plan is written there.
            state_dict_type: ``"full"``: checkpoints are one file, gathered on rank 0, that plain
                Lightning loads; ``"sharded"``: a directory where each rank writes the tensors it
                holds, without any gather (``python -m lightning_rannc consolidate`` makes it one file).
            profile_cache: directory where measured block costs are kept, keyed by graph, shapes
                and device, so that the next run skips profiling. ``None``: kept in memory only.
            measure_links: time point-to-point and all-reduce transfers at setup (about 0.1 s) and
                plan with the measured bandwidths instead of the device preset's.
            trace: path of a Chrome/Perfetto trace of what each rank did in the first ``trace_steps``
                steps (forward and backward of each micro-batch per stage, collectives, optimizer
                step), written by rank 0 at the end of ``fit``.
            trace_steps: how many training steps ``trace`` records.
            verify: on the first step, also run the whole step unpartitioned on each rank's batch
                (same random streams) and compare the loss and every gradient; above
                ``verify_tolerance`` (relative) every rank raises, with the largest difference named.
            verify_tolerance: the largest relative difference ``verify`` accepts.
            terminate_on_nan: raise on every rank at the first step whose loss is NaN or infinite
                (``False``: as Lightning, the value is logged and training goes on).
            pipelined_evaluation: run ``validation_step``, ``test_step`` and ``predict_step``
                forward only through the training pipeline (``True``), or gather the whole module
                on every rank for them (``False``: evaluation steps with Python side effects).
            zero_bubble: run the 1F1B schedules as zero bubble (``ScheduleInterleavedZeroBubble``):
                each backward split into the input gradient, sent on at once, and the weight
                gradient, run where the pipeline would idle. Needs a 1F1B schedule (at least as
                many micro-batches as stages).
            fault_timeout: seconds a rank may show no sign of life (killed, frozen) before every
                rank stops; a rank that raises stops the others within about a second.
            process_group_backend: ``"gloo"``/``"nccl"``; default follows the device.
            timeout: seconds a collective may wait before the process group gives up.
            start_method: ``"popen"`` re-runs the script per rank (like ``ddp``); others spawn.

        The options from ``pipeline_stages`` to ``timeout`` form a ``RaNNCConfig``; each can also
        come from an environment variable ``RANNC_<OPTION>`` (``RANNC_MICRO_BATCHES=8``), which
        wins over the argument.
        """
        super().__init__(  # type: ignore[call-arg]
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self.config = RaNNCConfig(
            pipeline_stages=pipeline_stages,
            micro_batches=micro_batches,
            max_micro_batches=max_micro_batches,
            min_micro_batch_size=min_micro_batch_size,
            schedule=schedule,
            virtual_stages=virtual_stages,
            activation_checkpointing=activation_checkpointing,
            memory_limit=memory_limit,
            memory_margin=memory_margin,
            device_preset=device_preset,
            max_blocks=max_blocks,
            profile_repeats=profile_repeats,
            deployment=deployment,
            state_dict_type=state_dict_type,
            profile_cache=profile_cache,
            measure_links=measure_links,
            trace=trace,
            trace_steps=trace_steps,
            verify=verify,
            verify_tolerance=verify_tolerance,
            terminate_on_nan=terminate_on_nan,
            pipelined_evaluation=pipelined_evaluation,
            zero_bubble=zero_bubble,
            fault_timeout=fault_timeout,
            timeout=timeout,
        ).with_env_overrides()
        config = self.config
        self.pipeline_stages = config.pipeline_stages
        self.micro_batches = config.micro_batches
        self.schedule = config.schedule
        self.virtual_stages = config.virtual_stages
        self.activation_checkpointing = config.activation_checkpointing
        self.memory_limit = config.memory_limit
        self.memory_margin = config.memory_margin
        self.device_preset = config.device_preset
        self.max_blocks = config.max_blocks
        self.profile_repeats = config.profile_repeats
        self.deployment = config.deployment
        self.profile_cache = config.profile_cache
        self.measure_links = config.measure_links
        self._profile_cache = ProfileCache(config.profile_cache)
        self._chosen_stages: int | None = None
        self._watchdog: Watchdog | None = None
        self._trace: EventTrace | None = None
        self._closure_end = 0.0
        self._process_group_backend = process_group_backend
        self._timeout = timedelta(seconds=config.timeout)
        self._start_method = start_method
        self._num_nodes = 1
        self._engine: PipelineEngine | None = None
        self._groups: ProcessGroups | None = None
        self._eval_gathered = False
        _configure_logger()

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
    def pipeline_degree(self) -> int:
        """Ranks per pipeline (S): as given, or as chosen at setup (``"auto"``), else all ranks."""
        if isinstance(self.pipeline_stages, int):
            return self.pipeline_stages
        return self._chosen_stages or self.world_size

    @property
    def num_replicas(self) -> int:
        """Data-parallel replicas of the pipeline (D)."""
        return max(1, self.world_size // self.pipeline_degree)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Every stage of a pipeline reads the same batch: shard the data over replicas only.
        return {"num_replicas": self.num_replicas, "rank": self.global_rank // self.pipeline_degree}

    @property
    def plan(self) -> Any:
        """The ``PartitionPlan`` in use (``None`` before the first training batch)."""
        return self._engine.plan if self._engine is not None else None

    # --- processes ----------------------------------------------------------------------

    @override
    def _configure_launcher(self) -> None:
        launchers = importlib.import_module(f"{self._namespace}.strategies.launchers")
        if self._start_method == "popen":
            self._launcher = launchers._SubprocessScriptLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes
            )
        else:
            self._launcher = launchers._MultiProcessingLauncher(self, start_method=self._start_method)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()  # type: ignore[misc]
        reset_seed()
        self.set_world_ranks()
        backend = self._process_group_backend or _get_default_process_group_backend_for_device(self.root_device)
        self._process_group_backend = backend
        assert self.cluster_environment is not None
        _init_dist_connection(self.cluster_environment, backend, timeout=self._timeout)
        atexit.register(_destroy_process_group_at_exit)
        self._start_watchdog()

    def _start_watchdog(self) -> None:
        if self.world_size == 1 or self._watchdog is not None:
            return
        # TODO(rannc): the rendezvous store has no public accessor; it is the one every rank shares.
        store = dist.distributed_c10d._get_default_store()
        self._watchdog = Watchdog(store, self.global_rank, self.world_size, self.config.fault_timeout)
        self._watchdog.start()

    @override
    def on_exception(self, exception: BaseException) -> None:
        # Lightning calls this on the rank that raised; the others may be waiting for it in a
        # collective: the watchdog tells them to stop.
        if self._watchdog is not None:
            self._watchdog.report_failure(exception)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero = importlib.import_module(f"{self._namespace}.utilities.rank_zero")
        rank_zero.rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank  # type: ignore[attr-defined]

    @override
    def setup(self, trainer: Any) -> None:
        self._check_trainer(trainer)
        assert self.accelerator is not None and self.lightning_module is not None
        # Lightning clips by the norm of this process's gradients; the model spans processes.
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm  # type: ignore[method-assign]
        scaler = getattr(self.precision_plugin, "scaler", None)
        if scaler is not None:
            # Each rank sees only its share of the gradients: all must agree on skipping a step.
            # The class's method, not the attribute: a second fit must not wrap the wrapper.
            scaler.unscale_ = functools.partial(
                self._unscale_agreed, scaler, functools.partial(type(scaler).unscale_, scaler)
            )
        self.accelerator.setup(trainer)
        assert self.model is not None
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        # The layout before the optimizers: `configure_optimizers` may read
        # `trainer.estimated_stepping_batches`, which shards the data loaders with
        # `distributed_sampler_kwargs`, so the replica count must be known by then.
        device = self._measured_links(trainer)
        self._choose_layout(trainer, device)
        if trainer.state.fn == "fit":
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == "fit":
            _optimizers_to_device(self.optimizers, self.root_device)
        if trainer.state.fn != "fit" and self._engine_fits_layout():
            self._rebind_engine()
        else:
            self._build_engine(trainer, self._engine_options(device))

    def _engine_fits_layout(self) -> bool:
        """Whether the last fit's plan can serve ``validate``/``test``/``predict`` (same layout)."""
        engine = self._engine
        if engine is None or engine.plan is None or engine.module is not self.lightning_module:
            return False  # another module (e.g. the best checkpoint loaded): it is whole on every rank
        return (engine.plan.pipeline_degree, engine.plan.num_replicas) == (self.pipeline_degree, self.num_replicas)

    def _rebind_engine(self) -> None:
        """Evaluate after ``fit`` with the parameters where training put them: new process groups
        (teardown destroyed the last ones), the same plan."""
        assert self._engine is not None
        self._groups = build_process_groups(self.pipeline_degree, self.num_replicas, self.global_rank, self.root_device)
        self._engine.rebind(self._groups)

    def _build_engine(self, trainer: Any, options: EngineOptions) -> None:
        assert self.lightning_module is not None
        self._groups = build_process_groups(self.pipeline_degree, self.num_replicas, self.global_rank, self.root_device)
        if self.config.trace is not None and trainer.state.fn == "fit":
            self._check_trace_path(self.config.trace)
            self._trace = EventTrace(self.global_rank, self.config.trace_steps)
        self._engine = PipelineEngine(
            self.lightning_module,
            options,
            rank=self.global_rank,
            device=self.root_device,
            groups=self._groups,
            cache=self._profile_cache,
            trace=self._trace,
        )

    def _check_trace_path(self, path: str) -> None:
        """Rank 0 writes the trace after training: a path it cannot write fails now, everywhere."""
        missing = self.broadcast(not Path(path).resolve().parent.is_dir() if self.global_rank == 0 else None)
        if missing:
            raise RuntimeSetupError(
                f"{type(self).__name__}(trace={path!r}): the folder {str(Path(path).parent)!r} does not exist on "
                "rank 0; create it or choose another path."
            )

    def _engine_options(self, device: DeviceSpec | None) -> EngineOptions:
        optimizer = getattr(self.optimizers[0], "_optimizer", self.optimizers[0]) if self.optimizers else None
        return EngineOptions(
            device=device,
            pipeline_degree=self.pipeline_degree,
            num_replicas=self.num_replicas,
            virtual_stages=self.virtual_stages,
            schedule=self.schedule,
            checkpointing=None if self.activation_checkpointing == "auto" else bool(self.activation_checkpointing),
            memory_limit=self._memory_limit(),
            memory_margin=self.memory_margin,
            device_preset=self.device_preset or _device_preset(self.root_device),
            devices_per_node=self.num_processes,
            optimizer=optimizer_kind(optimizer) if optimizer is not None else "sgd",
            num_microbatches=None if self.micro_batches == "auto" else int(self.micro_batches),
            max_microbatches=self.config.max_micro_batches,
            min_microbatch_size=self.config.min_micro_batch_size,
            max_blocks=self.max_blocks,
            profile_repeats=self.profile_repeats,
            deployment=self.deployment,
            verify=self.config.verify,
            verify_tolerance=self.config.verify_tolerance,
            zero_bubble=self.config.zero_bubble,
        )

    def _measured_links(self, trainer: Any) -> DeviceSpec | None:
        """The device preset with measured link bandwidths (collective, fit only); ``None``: the preset."""
        if not self.measure_links or self.world_size == 1 or trainer.state.fn != "fit":
            return None
        links = measure_links(self.root_device, local_world_size=self.num_processes)
        if self.global_rank == 0:
            log.info(links.describe())
        return apply_links(get_device(self.device_preset or _device_preset(self.root_device)), links)

    def _choose_layout(self, trainer: Any, device: DeviceSpec | None) -> None:
        """``pipeline_stages="auto"``: rank 0 plans every layout on a sample batch and all ranks
        take its choice (or its error). Here, because Lightning shards the data loaders over the
        replicas right after setup. The optimizers do not exist yet: their state is sized as
        Adam's (two moments), the most common and the larger. Collective."""
        if self.pipeline_stages != "auto" or self.world_size == 1 or trainer.state.fn != "fit":
            return
        self._chosen_stages = None
        options = dataclasses.replace(self._engine_options(device), optimizer="adamw")
        payload: list[Any] = [None]
        if self.global_rank == 0:
            try:
                payload[0] = self._best_layout(trainer, options)
            except Exception as error:  # every rank must raise it, not wait for a layout
                payload[0] = error
        payload = self.broadcast(payload)
        if isinstance(payload[0], Exception):
            raise payload[0]
        layout: Layout = payload[0]
        self._chosen_stages = layout.pipeline_degree
        if self.global_rank == 0:
            log.info(layout.summary)

    def _best_layout(self, trainer: Any, options: EngineOptions) -> Layout:
        batch = self._sample_batch(trainer)
        if batch is None:
            return Layout(self.world_size, 1, "layout: no training batch to plan from; one pipeline over all devices")
        module = self.lightning_module
        assert module is not None
        with self.precision_plugin.train_step_context():
            return choose_layout(module, batch, options, self.world_size, self.root_device, self._profile_cache)

    def _sample_batch(self, trainer: Any) -> Any:
        """The first training batch as the step will get it, without disturbing the training run
        (the shuffling sampler draws from the global RNG)."""
        # TODO(rannc): Lightning has no public accessor for the train loader before setup_data.
        source = trainer.fit_loop._data_source
        if trainer.limit_train_batches == 0 or not source.is_defined():
            return None
        combined_loader = importlib.import_module(f"{self._namespace}.utilities").CombinedLoader
        with torch.random.fork_rng(devices=[]):  # the user's transfer hooks may draw random numbers too
            loaders = source.dataloader()
            combined = loaders if isinstance(loaders, combined_loader) else combined_loader(loaders, "max_size_cycle")
            batch = next(iter(combined), None)
            return None if batch is None else self.precision_plugin.convert_input(self.batch_to_device(batch[0]))

    def _memory_limit(self) -> int | None:
        if self.memory_limit is not None:
            return parse_bytes(self.memory_limit)
        if self.root_device.type == "cuda":
            return torch.cuda.get_device_properties(self.root_device).total_memory
        return None

    def _check_trainer(self, trainer: Any) -> None:
        name = type(self).__name__
        stages = self.pipeline_degree
        if self.world_size % stages:
            raise RuntimeSetupError(
                f"{name}(pipeline_stages={stages}) needs a multiple of {stages} processes (one pipeline "
                f"per replica), but the Trainer has {self.world_size} (devices x num_nodes): change "
                "pipeline_stages or the number of devices."
            )
        if not trainer.lightning_module.automatic_optimization:
            raise RuntimeSetupError(
                f"{name} runs the pipelined step for you, so it needs automatic optimization; "
                f"{type(trainer.lightning_module).__name__} sets `automatic_optimization = False`."
            )
        if str(trainer.precision) not in _SUPPORTED_PRECISION:
            raise RuntimeSetupError(
                f"{name} supports precision={list(_SUPPORTED_PRECISION)} so far; got "
                f"Trainer(precision={trainer.precision!r})."
            )

    @override
    def model_to_device(self) -> None:
        # Tensors on the meta device stay there: each rank materialises only its stage's.
        assert self.model is not None
        self.model._apply(lambda t: t if t.is_meta else t.to(self.root_device))

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        """``trainer.init_module(empty_init=True)`` builds the module on the meta device: no rank
        allocates it; at the first batch each rank allocates and initialises (with the modules'
        ``reset_parameters``) only the tensors of its own stages."""
        if not empty_init:
            with super().tensor_init_context(empty_init):  # type: ignore[misc]
                yield
            return
        with torch.device("meta"), self.precision_plugin.tensor_init_context():
            yield

    # --- the training step ----------------------------------------------------------------

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch, batch_idx = _batch_and_index(args, kwargs)
        batch = self.precision_plugin.convert_input(batch)
        engine = self._engine
        assert engine is not None, "training_step before setup"
        # Capture, profile and run under the precision's context (autocast, default dtype):
        # the captured graph then knows the dtypes its values have at run time.
        scaler = getattr(self.precision_plugin, "scaler", None)
        with self.precision_plugin.train_step_context():
            if not engine.built:
                engine.build(batch)
                engine.restrict_optimizers(self.optimizers)
            values = engine.run(batch, batch_idx, loss_scale=float(scaler.get_scale()) if scaler else 1.0)
        if self.config.terminate_on_nan and not torch.isfinite(values[0]):
            # The loss is shared: every rank raises here, at the same step.
            raise ValueError(
                f"`training_step` ({engine.where}) returned a loss of {float(values[0])} at batch {batch_idx} "
                "(step {step}); stopping because RaNNCStrategy(terminate_on_nan=True).".format(
                    step=self.lightning_module.trainer.global_step if self.lightning_module is not None else "?"
                )
            )
        engine.replay_logs(values)
        return engine.step_output(values)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        # The schedule already ran backward inside training_step; here the held gradients are added,
        # around the same hooks Lightning fires for a normal backward.
        assert self._engine is not None and self.lightning_module is not None
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        self._engine.accumulate_grads(1.0 / self.lightning_module.trainer.accumulate_grad_batches)
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        self._closure_end = time.perf_counter()
        return closure_loss

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._trace is not None:  # the closure (the step itself) ended in `backward`
            self._trace.interval("optimizer step", "optimizer", self._closure_end, time.perf_counter())
        if self._engine is not None and self._engine.built:
            self._engine.after_optimizer_step()
        return output

    def _unscale_agreed(self, scaler: Any, unscale: Any, optimizer: Optimizer) -> None:
        """GradScaler.unscale_, then an overflow found on any rank counts on every rank."""
        unscale(optimizer)
        assert self._engine is not None
        self._engine.unscale_updated_elsewhere(1.0 / float(scaler.get_scale()))
        # TODO(rannc): GradScaler keeps per-optimizer overflow flags in a private dict; no public hook.
        found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        total = torch.stack([f.to(self.root_device) for f in found.values()]).amax() if found else None
        if total is None:
            total = torch.zeros((), device=self.root_device)
        if _distributed_is_initialized():
            dist.all_reduce(total, op=dist.ReduceOp.MAX)
        for device, flag in found.items():
            flag.copy_(total.to(device))
        if not found:  # no parameter here: register the agreed flag for step() and update()
            found[self.root_device] = total

    def _clip_grad_by_norm(self, optimizer: Optimizer, clip_val: int | float) -> None:
        assert self._engine is not None
        self._engine.clip_grad_norm(float(clip_val))

    # --- evaluation: forward only through the pipeline ---------------------------------------

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluation_step("validation_step", self.precision_plugin.val_step_context, args, kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluation_step("test_step", self.precision_plugin.test_step_context, args, kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluation_step("predict_step", self.precision_plugin.predict_step_context, args, kwargs)

    def _evaluation_step(self, name: str, context: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Once a plan exists, evaluation steps run through its pipeline (each rank uses only
        its stages' parameters); before (the sanity check, a fresh Trainer) every rank still holds
        the whole module and runs the step as Lightning does."""
        engine = self._engine
        if engine is None or not engine.built or self._eval_gathered:
            return getattr(super(), name)(*args, **kwargs)
        batch, batch_idx = _batch_and_index(args, kwargs)
        extra = tuple(args[2:]) + tuple(v for k, v in kwargs.items() if k not in ("batch", "batch_idx"))
        with context():
            result = engine.evaluate(name, self.precision_plugin.convert_input(batch), batch_idx, extra)
        if not isinstance(result, NotPipelined):
            return result
        self._gather_for_evaluation(result.reason)
        return getattr(super(), name)(*args, **kwargs)

    def _gather_for_evaluation(self, reason: str) -> None:
        """The whole module on every rank until the evaluation loop ends. Only with one pipeline:
        replicas read other batches, so they could not agree on the moment to gather."""
        assert self._engine is not None
        advice = "or set `RaNNCStrategy(pipelined_evaluation=False)` to gather the whole module for evaluation"
        if self._engine.from_meta:
            raise RuntimeSetupError(
                f"{reason} A module created on the meta device is evaluated only through the pipeline: change the step."
            )
        if self.num_replicas > 1:
            raise RuntimeSetupError(f"{reason} Change the step, {advice}.")
        if self.is_global_zero:
            log.warning("%s The whole module is gathered on every rank for this evaluation (%s).", reason, advice[3:])
        self._eval_gathered = True
        self._engine.materialize()

    def _check_evaluation(self) -> None:
        self._eval_gathered = False
        engine = self._engine
        if engine is not None and not engine.built and engine.from_meta:
            raise RuntimeSetupError(
                f"{type(self).__name__} evaluates a module created on the meta device only through the plan "
                "of a `fit` with this Trainer (no rank holds the whole module): set `num_sanity_val_steps=0`, "
                "and call validate/test/predict after `fit`."
            )
        if engine is not None and engine.built and not self.config.pipelined_evaluation and not engine.from_meta:
            self._eval_gathered = True
            engine.materialize()

    def _end_evaluation(self) -> None:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if self._eval_gathered and trainer is not None and trainer.state.fn == "fit" and not trainer.should_stop:
            self._release()
        self._eval_gathered = False

    def _materialize(self) -> None:
        if self._engine is not None and self._engine.built:
            self._engine.materialize()

    def _release(self) -> None:
        if self._engine is not None and self._engine.built:
            self._engine.release()

    @override
    def on_validation_start(self) -> None:
        self._check_evaluation()

    @override
    def on_test_start(self) -> None:
        self._check_evaluation()

    @override
    def on_predict_start(self) -> None:
        self._check_evaluation()

    @override
    def on_validation_end(self) -> None:
        self._end_evaluation()

    @override
    def on_test_end(self) -> None:
        self._end_evaluation()

    @override
    def on_predict_end(self) -> None:
        self._end_evaluation()

    @override
    def on_train_end(self) -> None:
        if self._trace is not None and self.config.trace is not None:
            self._trace.write(self.config.trace)
            if self.is_global_zero:
                log.info("wrote the runtime trace %s", self.config.trace)
            self._trace = None
        # A module built on the meta device may not fit one device: it stays partitioned.
        if self._engine is not None and not self._engine.from_meta:
            self._materialize()

    # --- checkpoints ----------------------------------------------------------------------

    @property
    def _sharded(self) -> bool:
        return self.config.state_dict_type == "sharded"

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._engine is None or not self._engine.built:
            return super().lightning_module_state_dict()  # type: ignore[misc]
        return self._engine.local_state_dict() if self._sharded else self._engine.full_state_dict(dst=0)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Tensor]:
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        if self._engine is None or not self._engine.built:
            return super().optimizer_state(optimizer)  # type: ignore[misc]
        index = [getattr(o, "_optimizer", o) for o in self.optimizers].index(optimizer)
        if self._sharded:
            return self._engine.local_optimizer_state(optimizer, index)
        return self._engine.full_optimizer_state(optimizer, index, dst=0)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not self._sharded:
            return super().save_checkpoint(checkpoint, filepath, storage_options)  # type: ignore[misc]
        save_sharded(checkpoint, Path(self.broadcast(str(filepath))), self.is_global_zero, self.barrier)

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        if module is not None and any(t.is_meta for t in module.state_dict().values()):
            # Loading into meta tensors is a no-op (torch only warns), and each rank would then
            # initialise its stage afresh: refuse rather than resume from random weights.
            raise RuntimeSetupError(
                f"{type(module).__name__} was created on the meta device (`trainer.init_module(empty_init=True)`); "
                "resuming it from a checkpoint is not supported yet. Create it normally to resume, or load the "
                "weights yourself after the first step."
            )
        super().load_model_state_dict(checkpoint, strict)  # type: ignore[misc]

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # The module is whole on every rank until the first batch: each rank reads every tensor.
        if is_sharded(checkpoint_path):
            return load_sharded(checkpoint_path)
        return integer_state_keys(super().load_checkpoint(checkpoint_path, weights_only))  # type: ignore[misc]

    # --- collectives --------------------------------------------------------------------

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if _distributed_is_initialized():
            dist.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        payload = [obj]
        dist.broadcast_object_list(payload, src)
        return payload[0]

    @override
    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        # Every rank of a pipeline holds the same values; Lightning's `sync_dist` means a reduction
        # over data-parallel replicas, as with DDP.
        if not isinstance(tensor, Tensor) or not _distributed_is_initialized():
            return tensor
        if group is None:
            if self._groups is None or self.num_replicas == 1:
                return tensor
            group = self._groups.dp_group
        return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        value = torch.tensor(int(decision), device=self.root_device)
        if _distributed_is_initialized():
            dist.all_reduce(value)
        return bool(value == self.world_size) if all else bool(value)

    @override
    def all_gather(self, tensor: Tensor, group: Any = None, sync_grads: bool = False) -> Tensor:
        return _all_gather_ddp_if_available(tensor, group=group, sync_grads=sync_grads)

    @override
    def teardown(self) -> None:
        if self._engine is not None:
            self._engine.restore_metric_groups()
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        # Lightning's teardown moves the module to the CPU; released tensors are meta and stay so.
        if self._groups is not None:
            self._groups.destroy()
            self._groups = None
        if self.cluster_environment is not None:
            self.cluster_environment.teardown()
        _optimizers_to_device(self.optimizers, torch.device("cpu"))
        if self.lightning_module is not None and self.root_device.type != "cpu":
            self.lightning_module._apply(lambda t: t if t.is_meta else t.cpu())
        self.precision_plugin.teardown()
        if self.accelerator is not None:
            self.accelerator.teardown()
        self.checkpoint_io.teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name,
            cls,
            description="Automatic pipeline partitioning of the training step (lightning_rannc)",
            override=True,
        )


class RaNNCStrategy(_RaNNCStrategyMixin, ParallelStrategy):
    """Trains an unmodified LightningModule split into pipeline stages across processes.

    The training step is captured with ``torch.export`` at the first batch, profiled, split into
    stages that balance the profiled time, and run micro-batched with
    ``torch.distributed.pipelining``. Example::

        import lightning as L
        import lightning_rannc  # registers "rannc"

        trainer = L.Trainer(strategy="rannc", accelerator="cpu", devices=2, max_steps=20)
        trainer.fit(MyLightningModule(), datamodule)
    """


def _batch_and_index(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, int]:
    batch = args[0] if args else kwargs["batch"]
    batch_idx = args[1] if len(args) > 1 else kwargs.get("batch_idx", 0)
    return batch, int(batch_idx)


def _destroy_process_group_at_exit() -> None:
    # A process group left for interpreter shutdown sometimes aborts the process ("terminate
    # called without an active exception", exit code 134) with gloo on torch 2.13, after
    # training finished: plain DDP runs show it too. Destroying it while Python still runs
    # lets its threads finish.
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _device_preset(device: torch.device) -> str:
    """The preset closest to ``device`` (an unknown GPU is planned as an H100)."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return next((preset for preset in ("h100", "a100", "v100") if preset in name), "h100")
