"""Train transformers models (``helpers.hf_models``) with plain Lightning or RaNNCStrategy.

Usage: ``python hf_run.py OUT_DIR DEVICES RUNS_JSON``; each run (in order, in this launch) has
``label``, ``kind``, ``pretrained`` (a ``save_pretrained`` directory), ``build`` (``init``:
under ``init_module(empty_init=True)`` with RaNNCStrategy; ``configure_model``;
``from_pretrained``: transformers' own loading), ``strategy`` (RaNNCStrategy arguments; absent:
plain Lightning), ``max_steps``, ``resume`` (a checkpoint path), ``save`` (a checkpoint path
written after fit), ``evaluate`` (validate/test/predict on a fresh Trainer and module, from the
``resume`` checkpoint, without fit). Each rank writes ``<label>_rank<r>.json`` with the keys
it read from weight files (pretrained and checkpoints) and the optimizer states it read.
"""

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

import lightning_rannc
from lightning_rannc.runtime import checkpoint, weights

from helpers.hf_models import HFModule, Recorder, data

READ: list[str] = []


def _record_reads() -> None:
    """Note every tensor read from a weight source or a sharded checkpoint's optimizer state."""
    opened = weights.open_source

    def open_source(source: Any) -> Any:
        opened_source = opened(source)
        read = opened_source.read

        def recorded(names: Any) -> Any:
            names = list(names)
            READ.extend(names)
            return read(names)

        opened_source.read = recorded
        return opened_source

    weights.open_source = open_source
    states = checkpoint.LazyStates.read

    def state(self: Any, indices: Any) -> Any:
        indices = list(indices)
        READ.extend(f"{self.name}.state.{index}" for index in indices)
        return states(self, indices)

    checkpoint.LazyStates.read = state


def _trainer(devices: int, run: dict[str, Any], callbacks: list[Any]) -> L.Trainer:
    options = run.get("strategy")
    strategy = lightning_rannc.RaNNCStrategy(timeout=120, **options) if options is not None else "auto"
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=run.get("max_steps", 6),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        num_sanity_val_steps=2,
        use_distributed_sampler=False,  # in order on every rank: one pipeline reads every batch, as one process
    )


def run_one(out_dir: Path, devices: int, run: dict[str, Any]) -> None:
    READ.clear()
    recorder = Recorder()
    options = run.get("strategy")
    trainer = _trainer(devices, run, [recorder])
    L.seed_everything(0, verbose=False)
    build = run.get("build", "init")
    if build == "init" and options is not None:
        with trainer.init_module(empty_init=True):
            model = HFModule(run["kind"], run.get("pretrained"), build)
    else:
        model = HFModule(run["kind"], run.get("pretrained"), build)
    extra: dict[str, Any] = {}
    if run.get("evaluate"):
        extra["validate"] = trainer.validate(model, data(16), ckpt_path=run.get("resume"), verbose=False)
        extra["test"] = trainer.test(model, data(16), verbose=False)
        extra["predict"] = [p.tolist() for p in trainer.predict(model, data(16))]
    else:
        if run.get("validate_first"):  # another Trainer evaluates the module first (its own plan)
            extra["validated_first"] = _trainer(devices, run, []).validate(model, data(16), verbose=False)
        trainer.fit(model, data(24), data(16), ckpt_path=run.get("resume"))  # epochs of 3 steps
        extra["val_loss"] = float(trainer.callback_metrics["val_loss"])
        if run.get("save"):
            trainer.save_checkpoint(run["save"])
        if run.get("fit_again"):  # a new Trainer on the trained, partitioned module: refused
            _trainer(devices, run, []).fit(model, data(24))
    plan = getattr(trainer.strategy, "plan", None)
    extra["stages"] = plan.pipeline_stages if plan is not None else None
    extra["read"] = sorted(set(READ))
    recorder.write(out_dir / f"{run['label']}_rank{trainer.global_rank}.json", trainer, model, **extra)


def main() -> None:
    out_dir, devices, runs = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    torch.set_num_threads(1)
    _record_reads()
    for run in runs:
        run_one(out_dir, devices, run)


if __name__ == "__main__":
    main()
