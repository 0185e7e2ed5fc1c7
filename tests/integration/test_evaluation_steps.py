"""Evaluation steps through the plan in this process (one device, one stage), against plain
Lightning: what is captured, what falls back to the whole module, and what is refused."""

from __future__ import annotations

import copy
import logging
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_rannc import RaNNCStrategy, RuntimeSetupError

from helpers.cases import QUIET
from helpers.models import LoggingMLP, table_loader

_QUIET = {**QUIET, "num_sanity_val_steps": 0}


def _fit(model: L.LightningModule, **strategy: Any) -> L.Trainer:
    trainer = L.Trainer(strategy=RaNNCStrategy(micro_batches=2, **strategy), **_QUIET)
    trainer.fit(model, table_loader())
    return trainer


def _pipelined_steps(trainer: L.Trainer) -> list[str]:
    return trainer.strategy.engine.pipeline.evaluation.pipelined_steps


def _plain(model: L.LightningModule) -> L.Trainer:
    return L.Trainer(**_QUIET)


class PerBatchPredictions(LoggingMLP):
    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.net(batch[:, : self.features]).mean(dim=0, keepdim=True)  # (1, classes): per batch


def test_a_per_batch_prediction_falls_back_to_the_whole_module_with_a_warning(caplog) -> None:
    model = PerBatchPredictions()
    trainer = _fit(model)
    with caplog.at_level(logging.WARNING, logger="lightning_rannc"):
        ours = trainer.predict(model, table_loader(size=16))
    assert (
        "`predict_step`" in caplog.text
        and "returns (or passes to a torchmetrics object) a tensor of shape (1, 4)" in caplog.text
    )
    assert _pipelined_steps(trainer) == []
    ref = _plain(model).predict(copy.deepcopy(model), table_loader(size=16))
    for mine, theirs in zip(ours, ref, strict=True):
        torch.testing.assert_close(mine, theirs)


def test_a_meta_device_module_refuses_a_step_it_cannot_pipeline_naming_it() -> None:
    trainer = L.Trainer(strategy=RaNNCStrategy(micro_batches=2), **_QUIET)
    with trainer.init_module(empty_init=True):
        model = PerBatchPredictions()
    trainer.fit(model, table_loader())
    with pytest.raises(RuntimeSetupError, match=r"`predict_step` \(.*test_evaluation_steps.py:\d+\).*meta device"):
        trainer.predict(model, table_loader(size=16))


class CollectsOutputs(LoggingMLP):
    """Lightning 2's idiom: validation_step appends to a list read at the epoch's end."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[torch.Tensor] = []
        self.epoch_means: list[float] = []

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.outputs.append(F.cross_entropy(self.net(batch[:, : self.features]), batch[:, self.features].long()))

    def on_validation_epoch_end(self) -> None:
        self.epoch_means.append(float(torch.stack(self.outputs).mean()))
        self.outputs.clear()


def test_a_step_with_python_side_effects_runs_on_the_whole_module() -> None:
    model = CollectsOutputs()
    trainer = _fit(model)
    trainer.validate(model, table_loader(size=16))
    reference = copy.deepcopy(model)
    reference.epoch_means.clear()
    _plain(reference).validate(reference, table_loader(size=16))
    assert model.epoch_means == pytest.approx(reference.epoch_means, rel=1e-6) and len(model.epoch_means) == 1
    assert _pipelined_steps(trainer) == []


class TwoLoadersAndConstants(LoggingMLP):
    """Several validation loaders (dataloader_idx), and a tensor constant only this step uses
    (export names constants by position: it must not be mistaken for the training step's)."""

    def __init__(self) -> None:
        super().__init__()
        self.train_shift = torch.tensor(0.5)
        self.val_scale = torch.tensor([2.0, 1.0, 1.0, 3.0])

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x, y = batch[:, : self.features] + self.train_shift, batch[:, self.features].long()
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch[:, : self.features], batch[:, self.features].long()
        logits = self.net(x) * self.val_scale * (dataloader_idx + 1)
        self.log("val_loss", F.cross_entropy(logits, y))


def test_several_loaders_and_step_constants_give_plain_lightning_values() -> None:
    model = TwoLoadersAndConstants()
    trainer = _fit(model)
    loaders = [table_loader(size=16), table_loader(size=24)]
    ours = trainer.validate(model, loaders, verbose=False)
    ref = _plain(model).validate(copy.deepcopy(model), loaders, verbose=False)
    assert _pipelined_steps(trainer) == ["validation_step"]
    assert len(ours) == len(ref) == 2
    for mine, theirs in zip(ours, ref):
        assert mine.keys() == theirs.keys()
        for key in theirs:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6)


def test_validate_after_fit_evaluates_the_module_it_is_given() -> None:
    model = LoggingMLP()
    trainer = _fit(model)
    other = LoggingMLP()  # e.g. the best checkpoint, loaded afresh
    torch.nn.init.zeros_(other.net[4].weight)
    ours = trainer.validate(other, table_loader(size=16), verbose=False)
    ref = _plain(other).validate(copy.deepcopy(other), table_loader(size=16), verbose=False)
    assert ours[0]["val_loss"] == pytest.approx(ref[0]["val_loss"], rel=1e-6)


def test_bf16_mixed_evaluation_matches_plain_lightning() -> None:
    model = LoggingMLP()
    trainer = L.Trainer(strategy=RaNNCStrategy(micro_batches=2), precision="bf16-mixed", **_QUIET)
    trainer.fit(model, table_loader())
    ours = trainer.validate(model, table_loader(size=16), verbose=False)
    plain = L.Trainer(precision="bf16-mixed", **_QUIET)
    ref = plain.validate(copy.deepcopy(model), table_loader(size=16), verbose=False)
    assert _pipelined_steps(trainer) == ["validation_step"]
    # bf16 keeps 8 bits of mantissa: micro-batch means and the batch mean differ by rounding only
    assert ours[0]["val_loss"] == pytest.approx(ref[0]["val_loss"], rel=2e-2)


def test_pipelined_evaluation_can_be_switched_off() -> None:
    model = LoggingMLP()
    trainer = _fit(model, pipelined_evaluation=False)
    ours = trainer.validate(model, table_loader(size=16), verbose=False)
    ref = _plain(model).validate(copy.deepcopy(model), table_loader(size=16), verbose=False)
    assert _pipelined_steps(trainer) == []
    assert ours[0]["val_loss"] == pytest.approx(ref[0]["val_loss"], rel=1e-6)


class _NamedRows(torch.utils.data.Dataset):
    def __init__(self, size: int) -> None:
        self.rows = table_loader(batch_size=size, size=size).dataset.data

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"row": self.rows[i], "name": f"row{i}.csv", "mask": None}


class NamedRowsMLP(LoggingMLP):
    """Batches with a file name (and a None) beside the tensor; predictions returned with their names."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch["row"], batch_idx)["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        assert batch["mask"] is None  # None stays None while the step is captured
        super().validation_step(batch["row"], batch_idx)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"probs": self.net(batch["row"][:, : self.features]).softmax(-1), "name": batch["name"]}


def _named_loader(size: int) -> torch.utils.data.DataLoader:
    collate = lambda rows: {  # noqa: E731
        "row": torch.stack([r["row"] for r in rows]),
        "name": [r["name"] for r in rows],
        "mask": None,
    }
    return torch.utils.data.DataLoader(_NamedRows(size), batch_size=8, collate_fn=collate)


def test_evaluation_batches_with_non_tensor_leaves_run_through_the_plan_and_return_them() -> None:
    model = NamedRowsMLP()
    trainer = L.Trainer(strategy=RaNNCStrategy(micro_batches=2), **_QUIET)
    trainer.fit(model, _named_loader(64))
    validated = trainer.validate(model, _named_loader(16), verbose=False)
    # two batches with other names, one capture: the names are not in the key
    assert (
        _pipelined_steps(trainer) == ["validation_step"]
        and len(trainer.strategy.engine.pipeline.evaluation.runtimes) == 1
    )
    predicted = trainer.predict(model, _named_loader(16))
    assert (
        _pipelined_steps(trainer) == ["predict_step"] and len(trainer.strategy.engine.pipeline.evaluation.runtimes) == 1
    )
    reference = _plain(model)
    assert validated[0]["val_loss"] == pytest.approx(
        reference.validate(copy.deepcopy(model), _named_loader(16), verbose=False)[0]["val_loss"], rel=1e-6
    )
    expected = reference.predict(copy.deepcopy(model), _named_loader(16))
    for mine, theirs in zip(predicted, expected, strict=True):
        assert mine["name"] == theirs["name"] and isinstance(mine["name"][0], str)
        torch.testing.assert_close(mine["probs"], theirs["probs"])


class CollectsPerLoader(CollectsOutputs):
    """The per-dataloader variant: a dict of lists, appended to inside the container."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs = {0: []}  # type: ignore[assignment]

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss = F.cross_entropy(self.net(batch[:, : self.features]), batch[:, self.features].long())
        self.outputs[0].append(loss)

    def on_validation_epoch_end(self) -> None:
        self.epoch_means.append(float(torch.stack(self.outputs[0]).mean()))
        self.outputs[0].clear()


def test_side_effects_inside_containers_are_seen_too() -> None:
    model = CollectsPerLoader()
    trainer = _fit(model)
    trainer.validate(model, table_loader(size=16))
    assert len(model.epoch_means) == 1 and _pipelined_steps(trainer) == []


class BranchingValidation(LoggingMLP):
    """A validation step that takes another path on its first batch, and logs the learning rate
    and an epoch-dependent value."""

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        x, y = batch[:, : self.features], batch[:, self.features].long()
        loss = F.cross_entropy(self.net(x), y)
        if batch_idx == 0:
            self.log("first_loss", loss * 3)
        else:
            self.log("later_loss", loss)
        if self.trainer.state.fn == "fit" or self.trainer.optimizers:  # plain Lightning's validate has none
            self.log("val_lr", self.optimizers().param_groups[0]["lr"] * 1000 + self.current_epoch)


def test_validation_branches_on_batch_idx_through_the_pipeline_as_in_lightning() -> None:
    model = BranchingValidation()
    trainer = _fit(model)
    ours = trainer.validate(model, table_loader(size=32), verbose=False)
    assert _pipelined_steps(trainer) == ["validation_step"]
    variants = [e for e in trainer.strategy.engine.pipeline.evaluation.runtimes.values()]
    assert [len(v.variants) for v in variants] == [2]  # batch 0's path, then every other batch's
    ref = _plain(model).validate(copy.deepcopy(model), table_loader(size=32), verbose=False)
    assert set(ours[0]) == set(ref[0]) | {"val_lr"} == {"first_loss", "later_loss", "val_lr"}
    for key in ("first_loss", "later_loss"):
        assert ours[0][key] == pytest.approx(ref[0][key], rel=1e-6), key
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert ours[0]["val_lr"] == pytest.approx(lr * 1000 + trainer.current_epoch)
