"""RaNNCStrategy in this process (one device, one stage): registration, numbers and errors."""

from __future__ import annotations

import collections
import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import pytest
import torch

import lightning_rannc
from lightning_rannc import CaptureError, RaNNCStrategy, RuntimeSetupError

from helpers.cases import QUIET, Recorder, load_record, run_case
from helpers.models import LoggingMLP, ReducingMLP, table_loader

_QUIET = QUIET


def _trainer(**kwargs) -> L.Trainer:
    options = {**_QUIET, **kwargs}
    options.setdefault("strategy", RaNNCStrategy(micro_batches=2))
    return L.Trainer(**options)


def test_importing_registers_rannc_in_lightning() -> None:
    assert "rannc" in L.pytorch.strategies.StrategyRegistry
    trainer = L.Trainer(strategy="rannc", accelerator="cpu", devices=1, logger=False)
    assert isinstance(trainer.strategy, lightning_rannc.RaNNCStrategy)
    assert trainer.strategy.micro_batches == "auto" and trainer.strategy.pipeline_stages == "auto"


def test_pytorch_lightning_gets_a_strategy_of_its_own_namespace(tmp_path: Path) -> None:
    pl = pytest.importorskip("pytorch_lightning")
    from lightning_rannc._pl_compat import RaNNCStrategy as PLRaNNCStrategy

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch[0]).pow(2).mean()
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(strategy="rannc", use_distributed_sampler=False, **_QUIET)
    assert isinstance(trainer.strategy, PLRaNNCStrategy)
    assert isinstance(trainer.strategy, pl.strategies.ParallelStrategy)
    assert type(trainer.strategy.launcher).__module__.startswith("pytorch_lightning.")  # its own launcher
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=8)
    trainer.fit(Tiny(), data)
    assert trainer.global_step == 2 and "loss" in trainer.callback_metrics


@pytest.mark.parametrize(
    "options",
    [
        {"accumulate_grad_batches": 2},
        {"gradient_clip_val": 0.05, "gradient_clip_algorithm": "value"},
        {"gradient_clip_val": 0.05, "gradient_clip_algorithm": "norm"},
    ],
    ids=["accumulate", "clip_value", "clip_norm"],
)
def test_micro_batches_match_single_process(tmp_path: Path, options: dict) -> None:
    ours, ref = tmp_path / "ours", tmp_path / "ref"
    ours.mkdir(), ref.mkdir()
    run_case(
        "logging", ours, strategy=RaNNCStrategy(micro_batches=4), devices=1, use_distributed_sampler=False, **options
    )
    torch.distributed.destroy_process_group()
    run_case("logging", ref, devices=1, **options)
    a, b = load_record(ours, "logging", 0), load_record(ref, "logging", 0)
    torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(b["losses"]), rtol=1e-5, atol=0)
    for key, value in b["final_state"].items():
        torch.testing.assert_close(a["final_state"][key], value, rtol=1e-5, atol=1e-6)


def test_selective_checkpointing_recomputes_a_stages_first_layers_and_trains_as_one_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan recomputing the first half of its stage's blocks (forced: on this machine's memory
    the search keeps every activation) gives plain Lightning's losses and weights, and each of
    those layers, a checkpoint region of its own, really runs again in backward: twice per
    micro-batch."""
    from lightning_rannc.plan import search
    from lightning_rannc.runtime.pipeline import SeededStage

    monkeypatch.setattr(search._Layout, "least_recompute", lambda self, stage, i, j: (j - i) // 2)
    runs: list[tuple[tuple[int, ...], int]] = []
    run = SeededStage._run

    def recording(self, key, *args, module=None):  # type: ignore[no-untyped-def]
        if module is not None:  # a recomputed region, not the kept layers
            runs.append((key, id(module)))
        return run(self, key, *args, module=module)

    monkeypatch.setattr(SeededStage, "_run", recording)
    ours, ref = tmp_path / "ours", tmp_path / "ref"
    ours.mkdir(), ref.mkdir()
    strategy = RaNNCStrategy(pipeline_stages=1, micro_batches=4, activation_checkpointing="auto")
    run_case("gpt_full", ours, strategy=strategy, devices=1, use_distributed_sampler=False)
    torch.distributed.destroy_process_group()
    run_case("gpt_full", ref, devices=1)
    a, b = load_record(ours, "gpt_full", 0), load_record(ref, "gpt_full", 0)
    stage = lightning_rannc.PartitionPlan.from_json(a["plan"]).stages[0]
    assert not stage.checkpoint and stage.node_start < (stage.recompute_end or 0) < stage.node_end
    assert stage.recompute_span and stage.recompute_span != stage.module_span
    regions = len(stage.recompute_cuts) + 1
    assert regions >= 3  # a region per layer: the embedding, the position's addition, blocks.0 ...
    counts = collections.Counter(runs)  # (micro-batch's random stream, region) -> runs
    assert len(counts) == 4 * len(a["losses"]) * regions and set(counts.values()) == {1, 2}
    # Each region recomputes in its forward's stream; only one whose ops save nothing for backward
    # (the addition of the position embedding) never needs to.
    assert len({region for (_, region), n in counts.items() if n == 2}) == regions - 1
    torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(b["losses"]), rtol=1e-5, atol=0)
    for key, value in b["final_state"].items():
        torch.testing.assert_close(a["final_state"][key], value, rtol=1e-5, atol=1e-5, msg=key)


def _fit(model: L.LightningModule, loader, **kwargs) -> None:
    _trainer(**kwargs).fit(model, loader)


@pytest.mark.parametrize(
    ("batch_size", "size", "expected"),
    [(6, 48, 3), (8, 20, 4)],  # 6 samples as 3 micro-batches; a last batch of 4 of a size-20 dataset
    ids=["not_divisible", "partial_last_batch"],
)
def test_batches_the_micro_batch_count_does_not_divide_train_correctly(
    tmp_path: Path, batch_size: int, size: int, expected: int
) -> None:
    losses = {}
    for name, strategy in (("ours", RaNNCStrategy(micro_batches=4)), ("ref", "auto")):
        L.seed_everything(0)
        model = LoggingMLP()
        loader = table_loader(batch_size=batch_size, size=size, drop_last=False)
        trainer = _trainer(strategy=strategy, max_steps=-1, max_epochs=2, use_distributed_sampler=False)
        recorder = Recorder(None)
        trainer.callbacks.append(recorder)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, loader)
        losses[name] = recorder.losses
        if name == "ours":
            adjusted = [str(w.message) for w in caught if "micro-batches must all have one shape" in str(w.message)]
            if expected != 4:  # the planned count does not divide the batch: said so, with the count used
                assert adjusted and f"runs as {expected} micro-batch(es)" in " ".join(adjusted)
            else:  # a last batch of 4 still takes the planned 4
                assert not adjusted
            assert trainer.strategy.plan.microbatches_for(batch_size) == expected
            torch.distributed.destroy_process_group()
    assert len(losses["ours"]) == 2 * -(-size // batch_size)
    torch.testing.assert_close(torch.tensor(losses["ours"]), torch.tensor(losses["ref"]), rtol=1e-5, atol=0)


def test_stage_count_must_divide_the_devices() -> None:
    with pytest.raises(RuntimeSetupError, match=r"pipeline_stages=2\) needs a multiple of 2 processes .* has 1"):
        _fit(LoggingMLP(), table_loader(), strategy=RaNNCStrategy(pipeline_stages=2))


def test_manual_optimization_is_refused() -> None:
    model = LoggingMLP()
    model.automatic_optimization = False
    with pytest.raises(RuntimeSetupError, match="needs automatic optimization"):
        _fit(model, table_loader())


def test_step_returning_none_is_refused_at_capture() -> None:
    class SkipsSteps(LoggingMLP):
        def training_step(self, batch, batch_idx):
            return None

    with pytest.raises(CaptureError, match="returned None"):
        _fit(SkipsSteps(), table_loader())


@pytest.mark.parametrize(
    ("option", "value"), [("micro_batches", 0), ("max_blocks", -1), ("pipeline_stages", 0), ("virtual_stages", 0)]
)
def test_invalid_options_name_the_option(option: str, value: int) -> None:
    with pytest.raises(ValueError, match=rf"RaNNCStrategy\({option}={value}\): {option} must be a positive integer"):
        RaNNCStrategy(**{option: value})


def test_unknown_schedule_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"RaNNCStrategy\(schedule='zb'\): valid values are \['auto', 'gpipe', '1f1b'"):
        RaNNCStrategy(schedule="zb")


def test_meta_device_module_without_reset_parameters_is_refused_with_the_module_named() -> None:
    class TopLevelParameter(LoggingMLP):
        def __init__(self) -> None:
            super().__init__()
            self.offset = torch.nn.Parameter(torch.zeros(4))

        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            return out["loss"] + self.offset.sum()

    trainer = _trainer()
    with trainer.init_module(empty_init=True):
        model = TopLevelParameter()
    assert all(p.is_meta for p in model.parameters())
    with pytest.raises(RuntimeSetupError, match=r"\['<the LightningModule>'\] define no `reset_parameters\(\)`"):
        trainer.fit(model, table_loader())


def test_a_meta_device_module_is_sanity_checked_through_its_pipeline() -> None:
    # No rank holds the whole module: the pipeline is planned and built before the sanity check.
    planned: list[bool] = []

    class Sees(L.Callback):
        def on_sanity_check_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            planned.append(trainer.strategy.plan is not None and trainer.global_step == 0)

    trainer = _trainer(limit_val_batches=1, num_sanity_val_steps=1, callbacks=[Sees()])
    with trainer.init_module(empty_init=True):
        model = LoggingMLP()
    trainer.fit(model, table_loader(), table_loader(size=16))
    assert planned == [True]
    assert trainer.strategy.engine.pipeline.evaluation.pipelined_steps == ["validation_step"]


def test_a_meta_device_module_built_by_validate_under_inference_mode_can_train(monkeypatch: pytest.MonkeyPatch) -> None:
    # `validate`/`test`/`predict` run under inference mode, except on gloo (no grad there): stand
    # in for NCCL, where the stages built there would otherwise hold inference tensors.
    import lightning.pytorch.loops.utilities as loops

    monkeypatch.setattr(loops, "_distributed_is_initialized", lambda: False)
    trainer = _trainer(limit_val_batches=1)
    with trainer.init_module(empty_init=True):
        model = LoggingMLP()
    trainer.validate(model, table_loader(size=16), verbose=False)
    assert trainer.strategy.plan is not None
    assert not any(t.is_inference() for t in model.state_dict().values())
    trainer.fit(model, table_loader())
    assert trainer.global_step == 2


def test_a_fresh_trainer_names_an_evaluation_batch_training_step_cannot_plan_a_meta_module_from() -> None:
    features_only = torch.utils.data.DataLoader(torch.randn(16, 12), batch_size=8)  # no label column
    trainer = _trainer()
    with trainer.init_module(empty_init=True):
        model = LoggingMLP()
    with pytest.raises(CaptureError, match=r"meta device: `validate` on a Trainer that did not fit.*`training_step`"):
        trainer.validate(model, features_only)


def test_a_meta_device_module_validates_through_the_plan_inside_fit() -> None:
    trainer = _trainer(limit_val_batches=2, num_sanity_val_steps=0, val_check_interval=2)
    with trainer.init_module(empty_init=True):
        model = LoggingMLP()
    trainer.fit(model, table_loader(), table_loader(size=16))
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
    assert trainer.strategy.engine.pipeline.evaluation.pipelined_steps == ["validation_step"]


def test_a_meta_device_module_resumes_as_the_same_module_built_whole(tmp_path: Path) -> None:
    trainer = _trainer()
    trainer.fit(LoggingMLP(), table_loader())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    runs = {}
    for meta in (False, True):
        torch.distributed.destroy_process_group()
        trainer = _trainer(max_steps=4)
        with trainer.init_module(empty_init=meta):
            model = LoggingMLP()
        assert all(p.is_meta for p in model.parameters()) == meta
        trainer.fit(model, table_loader(), ckpt_path=tmp_path / "last.ckpt")
        runs[meta] = (float(trainer.callback_metrics["train_loss"]), model.state_dict())
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-6)
    for key, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], value, msg=key)


def test_a_meta_device_module_reloads_a_checkpoint_into_its_stages_after_fit(tmp_path: Path) -> None:
    trainer = _trainer(limit_val_batches=2, num_sanity_val_steps=0)
    with trainer.init_module(empty_init=True):
        model = LoggingMLP()
    trainer.fit(model, table_loader(), table_loader(size=16))
    trainer.save_checkpoint(tmp_path / "fit.ckpt")
    before = trainer.validate(model, table_loader(size=16), verbose=False)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    after = trainer.validate(model, table_loader(size=16), ckpt_path=tmp_path / "fit.ckpt", verbose=False)
    assert after == before
    for key, value in saved.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)


class ReadsChangingNumbersMLP(LoggingMLP):
    """Branches on batch_idx and on a number a hook changes, and logs the learning rate (StepLR
    halves it every 2 steps), values computed from it and the trainer's counters."""

    def __init__(self) -> None:
        super().__init__()
        self.boost = 1
        self.halve = False

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.boost = 1 + (batch_idx // 3) % 2
        self.halve = batch_idx % 4 == 3

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x, y = batch[:, : self.features], batch[:, self.features].long()
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        if batch_idx % 2 == 0:
            loss = loss * 10
        if self.boost > 1:
            loss = loss + 0.5 * loss
        if self.halve:  # a bool attribute: not watched, but a guard
            loss = loss / 2
        lr = self.optimizers().param_groups[0]["lr"]
        self.log("lr", lr)
        self.log("lr_scaled", lr * 100 + self.global_step)
        self.log("last_lr", self.lr_schedulers().get_last_lr()[0])
        self.log("epoch", self.current_epoch)
        self.log("index", batch_idx)
        return loss


def test_numbers_that_change_between_steps_are_re_read_and_branches_follow_them_as_in_lightning() -> None:
    steps, epoch, weights = _reduced_run(RaNNCStrategy(micro_batches=2), ReadsChangingNumbersMLP, max_epochs=2)
    ref_steps, ref_epoch, ref_weights = _reduced_run("auto", ReadsChangingNumbersMLP, max_epochs=2)
    assert len(steps) == len(ref_steps) == 16
    assert len({s["lr"] for s in ref_steps}) > 4 and {s["epoch"] for s in ref_steps} == {0.0, 1.0}
    for ours, theirs in zip(steps, ref_steps):
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for key, value in ref_weights.items():  # the branches' losses trained the weights
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-5, msg=key)


class EpochInTensorMLP(LoggingMLP):
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)["loss"]
        return loss * (1 + self.current_epoch)


def test_a_changing_number_used_in_a_tensor_operation_is_refused_with_the_line_named() -> None:
    line = r"test_strategy\.py:\d+: `return loss \* \(1 \+ self\.current_epoch\)`"
    stale = r"\(1\), which is now 2"
    with pytest.raises(CaptureError, match=rf"uses self\.current_epoch in a tensor operation at .*{line}.*{stale}"):
        _fit(EpochInTensorMLP(), table_loader(), max_steps=-1, max_epochs=2)


class NamesLogsByIndexMLP(LoggingMLP):
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)["loss"]
        self.log(f"loss_{batch_idx}", loss)
        return loss


def test_a_step_that_takes_a_new_path_at_every_step_is_refused_after_a_few() -> None:
    line = r"`self\.log\(f\"loss_\{batch_idx\}\", loss\)`"
    with pytest.raises(CaptureError, match=rf"more than 8 different paths .*{line}"):
        _fit(NamesLogsByIndexMLP(), table_loader(size=128), max_steps=-1, max_epochs=1)


def test_deployment_is_saved_then_reused_without_profiling_and_refused_when_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "plan.json"
    _fit(LoggingMLP(), table_loader(), strategy=RaNNCStrategy(micro_batches=2, deployment=str(path)))
    saved = lightning_rannc.PartitionPlan.load(path)
    torch.distributed.destroy_process_group()

    def no_profiling(*args, **kwargs):
        raise AssertionError("a deployment must skip profiling")

    monkeypatch.setattr("lightning_rannc.runtime.planning.profile_blocks", no_profiling)
    trainer = _trainer(strategy=RaNNCStrategy(micro_batches=2, deployment=str(path)))
    trainer.fit(LoggingMLP(), table_loader())
    assert trainer.strategy.plan.stages == saved.stages
    torch.distributed.destroy_process_group()
    stale = r"planned for another run \(replica_batch_size: saved 8, now 4"
    with pytest.raises(lightning_rannc.PlanError, match=stale):
        _fit(LoggingMLP(), table_loader(batch_size=4), strategy=RaNNCStrategy(micro_batches=2, deployment=str(path)))


def test_memory_limit_turns_on_checkpointing_where_needed_and_keeps_the_numbers(tmp_path: Path) -> None:
    # GPipe holds all four micro-batches' activations; checkpointing keeps only their inputs.
    options = dict(micro_batches=4, schedule="gpipe", activation_checkpointing="auto")
    roomy = run_case("cnn", tmp_path, "roomy", strategy=RaNNCStrategy(**options), devices=1)
    torch.distributed.destroy_process_group()
    stage = roomy.strategy.plan.stages[0]
    assert not stage.checkpoint and stage.memory["activations"] > 0
    # Checkpointed, three of the four micro-batches' activations go: ask for half of that back.
    tight_limit = int((stage.memory["total"] - 3 * stage.memory["activations"] // 8) / 0.9)
    tight = run_case("cnn", tmp_path, "tight", strategy=RaNNCStrategy(memory_limit=tight_limit, **options), devices=1)
    torch.distributed.destroy_process_group()
    recomputing = tight.strategy.plan.stages[0]  # the whole stage, or its first layers (selective)
    assert recomputing.checkpoint or recomputing.recompute_end is not None
    assert recomputing.memory["total"] <= 0.9 * tight_limit
    assert recomputing.memory["total"] < stage.memory["total"]
    a, b = load_record(tmp_path, "tight", 0), load_record(tmp_path, "roomy", 0)
    torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(b["losses"]), rtol=1e-6, atol=0)


def test_memory_limit_nothing_fits_names_what_would_and_the_lower_precision_that_does(tmp_path: Path) -> None:
    options = dict(micro_batches=2, offload_optimizer=False)
    roomy = run_case("gpt", tmp_path, "roomy", strategy=RaNNCStrategy(**options), devices=1)
    torch.distributed.destroy_process_group()
    limit = int(0.8 * roomy.strategy.plan.stages[0].memory["total"] / 0.9)  # fp32 needs 25% more
    refused = r"does not fit on 1 device\(s\).*at least [0-9.]+ GiB"
    with pytest.raises(lightning_rannc.PlanError, match=refused) as error:
        run_case("gpt", tmp_path, "fp32", strategy=RaNNCStrategy(memory_limit=limit, **options), devices=1)
    torch.distributed.destroy_process_group()
    assert "Trainer(precision='bf16-true') (it finds 1 stage(s)" in str(error.value)
    # The remedy holds: the same limit in that precision trains.
    half = run_case(
        "gpt", tmp_path, "bf16", strategy=RaNNCStrategy(memory_limit=limit, **options), devices=1, precision="bf16-true"
    )
    torch.distributed.destroy_process_group()
    assert half.strategy.plan.stages[0].memory["total"] <= 0.9 * limit
    assert len(load_record(tmp_path, "bf16", 0)["losses"]) == len(load_record(tmp_path, "roomy", 0)["losses"])


def test_verify_compares_the_first_step_with_the_unpartitioned_one(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lightning_rannc"):
        _fit(LoggingMLP(), table_loader(), strategy=RaNNCStrategy(micro_batches=4, verify=True, verify_tolerance=1e-5))
    line = next(r.message for r in caplog.records if r.message.startswith("verify:"))
    assert float(line.split("gradients by at most ")[1].split(" ")[0]) < 1e-5


def test_verify_names_the_parameter_whose_gradient_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_rannc.runtime.pipeline import PipelineRuntime

    honest = PipelineRuntime.pending_grads

    def off_by_a_tenth_for_the_last_layer(self):  # type: ignore[no-untyped-def]
        grads = dict(honest(self))
        for param in grads:
            if param.shape == (4, 32):  # net.4.weight
                grads[param] = grads[param] * 1.1
        return grads

    monkeypatch.setattr(PipelineRuntime, "pending_grads", off_by_a_tenth_for_the_last_layer)
    with pytest.raises(
        RuntimeSetupError, match=r"verify=True found a difference: .*gradients by at most 1\.0\de-01 .*`net\.4\.weight`"
    ):
        _fit(LoggingMLP(), table_loader(), strategy=RaNNCStrategy(micro_batches=4, verify=True))


def _losses(model: L.LightningModule, loader, **trainer: object) -> list[float]:
    recorder = Recorder(None)
    run = _trainer(callbacks=[recorder], use_distributed_sampler=False, **trainer)
    run.fit(model, loader)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return recorder.losses


def test_closure_optimizers_like_lbfgs_work_as_on_one_device() -> None:
    """LBFGS evaluates the step several times per update: each evaluation runs the pipeline."""

    class WithLBFGS(LoggingMLP):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=3)

    L.seed_everything(0)
    ours = _losses(WithLBFGS(), table_loader(), max_steps=3)
    L.seed_everything(0)
    ref = _losses(WithLBFGS(), table_loader(), max_steps=3, strategy="auto")
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=1e-4, atol=0)


def test_a_nan_loss_is_logged_and_training_goes_on_as_in_lightning() -> None:
    rows = torch.cat([torch.randn(64, 12), torch.randint(0, 4, (64, 1)).float()], dim=1)
    rows[9, 0] = float("nan")  # in the second batch
    loader = torch.utils.data.DataLoader(rows, batch_size=8)
    L.seed_everything(0)
    ours = _losses(LoggingMLP(), loader, max_steps=4)
    L.seed_everything(0)
    ref = _losses(LoggingMLP(), loader, max_steps=4, strategy="auto")
    assert len(ours) == 4 and torch.isnan(torch.tensor(ours[1:])).all()
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=1e-5, atol=0, equal_nan=True)


def test_terminate_on_nan_stops_at_the_first_non_finite_loss() -> None:
    rows = torch.cat([torch.randn(64, 12), torch.randint(0, 4, (64, 1)).float()], dim=1)
    rows[9, 0] = float("nan")  # in the second batch
    loader = torch.utils.data.DataLoader(rows, batch_size=8)
    strategy = RaNNCStrategy(micro_batches=2, terminate_on_nan=True)
    trainer = _trainer(strategy=strategy, max_steps=4, use_distributed_sampler=False)  # batches in order
    with pytest.raises(ValueError, match=r"`training_step` \(.*models.py:\d+\) returned a loss of nan at batch 1"):
        trainer.fit(LoggingMLP(), loader)
    assert trainer.global_step == 1  # the first step was taken, the second was not


class _NamedRows(torch.utils.data.Dataset):
    """Rows with a file name and a list of numbers beside the tensor, as many datasets have."""

    def __init__(self) -> None:
        self.rows = torch.cat([torch.randn(64, 12), torch.randint(0, 4, (64, 1)).float()], dim=1)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"row": self.rows[i], "name": f"row{i}.csv", "shape": [12, 1]}


class NamedRowsMLP(LoggingMLP):
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch["row"], batch_idx)["loss"]


def test_non_tensor_batch_leaves_the_step_does_not_use_pass_through() -> None:
    loader = torch.utils.data.DataLoader(_NamedRows(), batch_size=8)
    L.seed_everything(0)
    ours = _losses(NamedRowsMLP(), loader, max_steps=3)
    L.seed_everything(0)
    ref = _losses(NamedRowsMLP(), loader, max_steps=3, strategy="auto")
    assert len(ours) == 3
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=1e-5, atol=0)


def test_a_checkpoint_interrupted_while_written_leaves_the_previous_one_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Full checkpoints go through Lightning's checkpoint IO, which writes a temporary file and
    renames it when complete: a crash mid-write must not leave a file that loads."""
    from fsspec.implementations.local import LocalFileOpener

    trainer = _trainer()
    trainer.fit(LoggingMLP(), table_loader())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    before = torch.load(path, weights_only=False)["global_step"]
    written = LocalFileOpener.write

    def half_then_crash(self, data):  # type: ignore[no-untyped-def]
        written(self, data[: len(data) // 2])
        raise OSError("disk gone")

    monkeypatch.setattr(LocalFileOpener, "write", half_then_crash)
    with pytest.raises(OSError, match="disk gone"):
        trainer.save_checkpoint(path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["global_step"] == before  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["model.ckpt"]  # no half-written file under the name


@dataclasses.dataclass
class _RowBatch:
    """A batch as a dataclass, as many codebases write their collate functions."""

    features: torch.Tensor
    labels: torch.Tensor
    source: str = "rows"


class _RowTuple(NamedTuple):
    features: torch.Tensor
    labels: torch.Tensor


def _row_batch(rows: list[torch.Tensor]) -> _RowBatch:
    stacked = torch.stack(rows)
    return _RowBatch(stacked[:, :12], stacked[:, 12])


def _row_tuple(rows: list[torch.Tensor]) -> _RowTuple:
    stacked = torch.stack(rows)
    return _RowTuple(stacked[:, :12], stacked[:, 12])


class DataclassBatchMLP(LoggingMLP):
    def training_step(self, batch: _RowBatch | _RowTuple, batch_idx: int) -> torch.Tensor:
        return super().training_step(torch.cat([batch.features, batch.labels[:, None]], dim=1), batch_idx)["loss"]


@pytest.mark.parametrize("collate", [_row_batch, _row_tuple], ids=["dataclass", "namedtuple"])
def test_a_dataclass_or_namedtuple_batch_trains_as_in_lightning(collate: Any) -> None:
    loader = torch.utils.data.DataLoader(_NamedRows().rows, batch_size=8, collate_fn=collate)
    L.seed_everything(0)
    ours = _losses(DataclassBatchMLP(), loader, max_steps=3)
    L.seed_everything(0)
    ref = _losses(DataclassBatchMLP(), loader, max_steps=3, strategy="auto")
    assert len(ours) == 3
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=1e-5, atol=0)


class _Opaque:
    """A batch type torch's pytrees do not open."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def to(self, device: torch.device) -> _Opaque:
        return self


class OpaqueBatchMLP(LoggingMLP):
    def training_step(self, batch: _Opaque, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch.rows, batch_idx)["loss"]


def test_a_batch_type_pytrees_cannot_open_is_named_with_what_to_do() -> None:
    loader = torch.utils.data.DataLoader(_NamedRows().rows, batch_size=8, collate_fn=lambda r: _Opaque(torch.stack(r)))
    with pytest.raises(CaptureError, match=r"holds no tensors: it is a _Opaque, which torch's pytrees do not open"):
        _fit(OpaqueBatchMLP(), loader, max_steps=1)


class ReturnsPerSampleMLP(LoggingMLP):
    """Returns the logits (per sample) and a scalar beside the loss, as many steps do."""

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch[:, : self.features], batch[:, self.features].long()
        logits = self.net(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        return {"logits": logits, "loss": loss, "hidden_norm": logits.norm(dim=-1).mean(), "labels": y}


class _Outputs(L.Callback):
    def __init__(self) -> None:
        self.outputs: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, *args: Any) -> None:
        self.outputs.append({key: value.clone() for key, value in outputs.items()})


def _returned(make_model: type[L.LightningModule], **trainer: object) -> list[dict[str, torch.Tensor]]:
    recorder = _Outputs()
    L.seed_everything(0)
    model = make_model()
    loader = torch.utils.data.DataLoader(_NamedRows().rows, batch_size=8)
    _trainer(callbacks=[recorder], use_distributed_sampler=False, max_steps=3, **trainer).fit(model, loader)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return recorder.outputs


def test_per_sample_values_returned_by_the_step_reach_the_hooks_as_in_lightning() -> None:
    ours = _returned(ReturnsPerSampleMLP, strategy=RaNNCStrategy(micro_batches=4))
    ref = _returned(ReturnsPerSampleMLP, strategy="auto")
    assert len(ours) == len(ref) == 3
    for mine, theirs in zip(ours, ref):
        assert list(mine) == list(theirs) == ["loss", "logits", "hidden_norm", "labels"]
        for key, value in theirs.items():  # logits in sample order over the 4 micro-batches
            assert mine[key].shape == value.shape and mine[key].dtype == value.dtype, key
            torch.testing.assert_close(mine[key], value, rtol=1e-5, atol=1e-6, msg=key)


class ReturnsPerClassMLP(LoggingMLP):
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        loss = super().training_step(batch, batch_idx)["loss"]
        return {"loss": loss, "class_weights": self.net[-1].weight.sum(dim=1)}  # one value per class


def test_a_returned_tensor_that_is_not_per_sample_is_refused_with_its_key_named() -> None:
    loader = torch.utils.data.DataLoader(_NamedRows().rows, batch_size=8)
    with pytest.raises(RuntimeSetupError, match=r"key 'class_weights', returns .* a tensor of shape \(4,\)"):
        _fit(ReturnsPerClassMLP(), loader, max_steps=1, strategy=RaNNCStrategy(micro_batches=4))  # 2 samples each


class _StepMetrics(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, *args: Any) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        returned = {f"returned_{k}": float(v) for k, v in outputs.items()} if isinstance(outputs, dict) else {}
        self.steps.append({**metrics, **returned})


def _reduced_run(
    strategy: Any, make_model: type[L.LightningModule] = ReducingMLP, max_epochs: int = 1
) -> tuple[list[dict[str, float]], dict[str, float], dict[str, torch.Tensor]]:
    L.seed_everything(0)
    model, recorder = make_model(), _StepMetrics()
    options = dict(callbacks=[recorder], use_distributed_sampler=False, max_steps=-1, max_epochs=max_epochs)
    trainer = _trainer(**options, strategy=strategy)
    trainer.fit(model, table_loader())
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    epoch = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return recorder.steps, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_logged_maxima_minima_and_sums_and_a_summed_loss_combine_over_micro_batches_as_in_lightning() -> None:
    steps, epoch, weights = _reduced_run(RaNNCStrategy(micro_batches=4))
    ref_steps, ref_epoch, ref_weights = _reduced_run("auto")
    assert len(steps) == len(ref_steps) == 8
    for ours, theirs in zip(steps, ref_steps):
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert {"worst_epoch", "best_epoch", "total_epoch", "mean_max_epoch", "wrong_epoch"} <= set(ref_epoch)
    assert epoch == pytest.approx(ref_epoch, rel=1e-5)
    for key, value in ref_weights.items():  # the summed loss's gradients are not divided by 4
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-5, msg=key)


class MaxLossMLP(LoggingMLP):
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x, y = batch[:, : self.features], batch[:, self.features].long()
        return torch.nn.functional.cross_entropy(self.net(x), y, reduction="none").max()


def test_a_loss_that_is_a_maximum_over_samples_is_refused_with_what_to_do() -> None:
    with pytest.raises(CaptureError, match=r"loss of `training_step` .* is a max over samples.*return a mean"):
        _fit(MaxLossMLP(), table_loader(), max_steps=1)
