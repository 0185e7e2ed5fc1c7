"""Validation, test and predict loops: through the training pipeline, or on the whole module.

Once a plan exists, evaluation steps run forward only through its pipeline: each rank uses only
its stages' parameters. Before (the sanity check, a fresh Trainer) every rank still holds the
whole module and runs the step as Lightning does. A step that cannot run through the plan makes
the module whole on every rank for the rest of that loop, with one pipeline only (replicas read
other batches, so they could not agree on the moment to gather), and never for a module created
on the meta device (no rank may hold all of it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning_rannc.errors import RuntimeSetupError
from lightning_rannc.integration import layout
from lightning_rannc.runtime.evaluation import NotPipelined
from lightning_rannc.runtime.watchdog import watched_step

if TYPE_CHECKING:
    from lightning_rannc.strategy import RaNNCStrategyMixin as RaNNCStrategy

__all__ = ["EvaluationLoops", "batch_and_index"]

log = logging.getLogger("lightning_rannc")

_ADVICE = "or set `RaNNCStrategy(pipelined_evaluation=False)` to gather the whole module for evaluation"


class EvaluationLoops:
    """Whether the module is whole on every rank for the running evaluation loop."""

    def __init__(self) -> None:
        self.gathered = False

    def step(
        self,
        strategy: RaNNCStrategy,
        name: str,
        context: Callable[[], Any],
        run_whole: Callable[..., Any],
        args: Any,
        kwargs: Any,
    ) -> Any:
        """Run ``validation_step``/``test_step``/``predict_step`` (``name``) for Lightning;
        ``run_whole`` is Lightning's own hook, which runs the step on the whole module."""
        engine = strategy.engine
        pipeline = engine.pipeline if engine is not None else None
        if pipeline is None or self.gathered:
            return run_whole(*args, **kwargs)
        batch, batch_idx = batch_and_index(args, kwargs)
        extra = tuple(args[2:]) + tuple(v for k, v in kwargs.items() if k not in ("batch", "batch_idx"))
        with context(), watched_step(strategy.watchdog, f"{name} {batch_idx}"):
            result = pipeline.evaluation.run(name, strategy.precision_plugin.convert_input(batch), batch_idx, extra)
        if not isinstance(result, NotPipelined):
            return result
        self._gather(strategy, result.reason)
        return run_whole(*args, **kwargs)

    def _gather(self, strategy: RaNNCStrategy, reason: str) -> None:
        assert strategy.engine is not None and strategy.engine.pipeline is not None
        if strategy.engine.from_meta:
            raise RuntimeSetupError(
                f"{reason} A module created on the meta device is evaluated only through the pipeline: change the step."
            )
        if strategy.layout.num_replicas > 1:
            raise RuntimeSetupError(f"{reason} Change the step, {_ADVICE}.")
        if strategy.is_global_zero:
            log.warning("%s The whole module is gathered on every rank for this evaluation (%s).", reason, _ADVICE[3:])
        self.gathered = True
        strategy.engine.pipeline.materialize()

    def start(self, strategy: RaNNCStrategy) -> None:
        """A loop starts: refuse what cannot work, and gather if pipelined evaluation is off."""
        self.gathered = False
        engine = strategy.engine
        if engine is None:
            return
        if engine.pipeline is None and engine.from_meta:
            module = strategy.lightning_module
            assert module is not None
            layout.build_for_evaluation(strategy, module.trainer)
        if engine.pipeline is not None and not strategy.config.pipelined_evaluation and not engine.from_meta:
            self.gathered = True
            engine.pipeline.materialize()

    def end(self, strategy: RaNNCStrategy) -> None:
        """A loop ends: inside ``fit``, give the gathered tensors back to their stages."""
        module = strategy.lightning_module
        trainer = module.trainer if module is not None else None
        engine = strategy.engine
        in_fit = trainer is not None and trainer.state.fn == "fit" and not trainer.should_stop
        if self.gathered and in_fit and engine is not None and engine.pipeline is not None:
            engine.pipeline.release()
        self.gathered = False


def batch_and_index(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, int]:
    """The batch and batch index of a step call, however Lightning passed them."""
    batch = args[0] if args else kwargs["batch"]
    batch_idx = args[1] if len(args) > 1 else kwargs.get("batch_idx", 0)
    return batch, int(batch_idx)
