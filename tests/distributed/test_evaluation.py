"""validation_step, test_step and predict_step run forward only through the training pipeline
(each rank keeps only its stages' parameters) and give what plain single-process Lightning gives:
the logged epoch values, the steps' returned values, and the predictions in dataset order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.dist import run_script
from helpers.eval_cases import load_evaluation, run_evaluation
from helpers.models import table_data

pytestmark = pytest.mark.distributed

RUNS = [
    {"label": "s2", "case": "gpt", "strategy": {"pipeline_stages": 2}},
    {"label": "s1d2", "case": "gpt", "strategy": {"pipeline_stages": 1}},
    {
        "label": "interleaved",
        "case": "gpt",
        "strategy": {"pipeline_stages": 2, "virtual_stages": 2, "schedule": "interleaved_1f1b", "zero_bubble": False},
    },
    # stages in a V (rank 0 runs the first and the last): evaluated forwards only in that placement
    {"label": "zbv", "case": "gpt", "strategy": {"pipeline_stages": 2, "schedule": "zbv"}},
    {"label": "dropout", "case": "gpt_dropout", "strategy": {"pipeline_stages": 2}},
    {"label": "cnn_bn", "case": "cnn_bn", "strategy": {"pipeline_stages": 2}},
    {"label": "metrics", "case": "mlp_metrics", "strategy": {"pipeline_stages": 2}},
    {"label": "metrics_d2", "case": "mlp_metrics", "strategy": {"pipeline_stages": 1}},
    # validation_step does not follow the training split: the module is gathered for it
    {"label": "out_of_order", "case": "gpt_out_of_order", "strategy": {"pipeline_stages": 2}},
    # a fresh Trainer has no plan: every rank evaluates the whole module, as Lightning does
    {"label": "fresh", "case": "gpt", "strategy": {"pipeline_stages": 2}, "weights": "s2"},
    # the same with the automatic layout: the data is sharded over both ranks, as with ddp
    {"label": "fresh_auto", "case": "gpt", "strategy": {"pipeline_stages": "auto"}, "weights": "s2"},
]
PIPELINED_STEPS = {
    "out_of_order": ["predict_step", "test_step"],
    "fresh": [],
    "fresh_auto": [],
}
"""Evaluation steps not run through the pipeline, by run; all three are in the others."""
REPLICAS = {"s1d2": 2, "metrics_d2": 2, "fresh_auto": 2}
"""Runs with data-parallel replicas; the others have one pipeline over both processes."""
TRAINED_LIKE_ONE_DEVICE = ("s2", "s1d2", "interleaved", "zbv", "out_of_order", "metrics", "metrics_d2")
"""Runs whose training equals one device's (no dropout, no per-micro-batch BatchNorm)."""

_OUT: dict[str, Path] = {}


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if "pipelined" not in _OUT:
        out = tmp_path_factory.mktemp("evaluation")
        run_script("evaluate.py", str(out), "2", json.dumps(RUNS), timeout=600)
        _OUT["pipelined"] = out
    return _OUT["pipelined"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, pipelined: Path):
    """Single process: ``fit`` from scratch (for the validations inside it), and the evaluation
    of the pipelined run's final weights."""

    def get(label: str, fit: bool) -> dict:
        run = next(r for r in RUNS if r["label"] == label)
        key = f"{label}_{'fit' if fit else 'weights'}"
        if key not in _OUT:
            out = tmp_path_factory.mktemp(key)
            weights = None if fit else pipelined / f"{run.get('weights', label)}_weights.pt"
            run_evaluation(run["case"], out, "ref", REPLICAS.get(label, 1), weights=weights, devices=1)
            _OUT[key] = out
        return load_evaluation(_OUT[key], "ref", 0)

    return get


def _close(ours: float, ref: float) -> None:
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("label", TRAINED_LIKE_ONE_DEVICE)
def test_validation_inside_fit_logs_the_single_process_values(pipelined: Path, reference, label: str) -> None:
    ref = reference(label, fit=True)["fit_validations"]
    for rank in range(2):
        ours = load_evaluation(pipelined, label, rank)["fit_validations"]
        assert len(ours) == len(ref) == 2 and set(ours[0]) == set(ref[0]) and len(ref[0]) >= 2
        for mine, theirs in zip(ours, ref):
            for key, value in theirs.items():
                _close(mine[key], value)


@pytest.mark.parametrize("label", [r["label"] for r in RUNS])
def test_validate_and_test_after_fit_match_single_process(pipelined: Path, reference, label: str) -> None:
    ref = reference(label, fit=False)
    for rank in range(2):
        ours = load_evaluation(pipelined, label, rank)
        expected_steps = PIPELINED_STEPS.get(label, ["predict_step", "test_step", "validation_step"])
        assert ours["pipelined_steps"] == expected_steps
        for kind in ("validated", "tested"):
            assert ours[kind][0].keys() == ref[kind][0].keys()
            for key, value in ref[kind][0].items():
                _close(ours[kind][0][key], value)


@pytest.mark.parametrize("label", [r["label"] for r in RUNS])
def test_predictions_and_returned_values_are_in_dataset_order(pipelined: Path, reference, label: str) -> None:
    ref = reference(label, fit=False)
    replicas = REPLICAS.get(label, 1)
    for rank in range(2):
        ours = load_evaluation(pipelined, label, rank)
        # Each replica predicts its DistributedSampler shard (every D-th sample), as with DDP.
        shard = rank % replicas if replicas > 1 else 0
        for key in ("predictions", "per_sample"):
            if key == "per_sample" and "per_sample" not in ref:
                continue
            expected = ref[key][shard::replicas]
            assert ours[key].shape == expected.shape
            if key == "predictions" and not ours[key].is_floating_point():
                assert (ours[key] == expected).float().mean() >= 0.99  # argmax may flip on near-ties
            else:
                torch.testing.assert_close(ours[key], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("label", ["s2", "interleaved", "zbv", "cnn_bn", "out_of_order"])
def test_parameters_stay_partitioned_during_validation_in_fit(pipelined: Path, label: str) -> None:
    for rank in range(2):
        partitioned = load_evaluation(pipelined, label, rank)["partitioned_during_validation"]
        # gathered for a validation step that does not follow the split, released after it
        assert partitioned and all(partitioned) == (label != "out_of_order")


@pytest.mark.parametrize("label", ["metrics", "metrics_d2"])
def test_torchmetrics_in_training_step_give_the_single_process_values(pipelined: Path, reference, label: str) -> None:
    ref = reference(label, fit=True)["fit_train_metrics"]
    assert set(ref) == {"train_acc", "train_acc_epoch"}
    # The step value is the replica's batch's (not synced, as with DDP); the epoch value is the
    # state gathered over replicas.
    compared = ref if REPLICAS.get(label, 1) == 1 else {"train_acc_epoch": ref["train_acc_epoch"]}
    for rank in range(2):
        ours = load_evaluation(pipelined, label, rank)["fit_train_metrics"]
        assert set(ours) == set(ref)
        for key, value in compared.items():
            _close(ours[key], value)


def test_torchmetrics_epoch_values_count_each_sample_once(pipelined: Path) -> None:
    # a sum over the validation labels: replicas' states gathered once each, not once per stage
    labels = sum(float(row[-1]) for row in table_data(36))
    for label in ("metrics", "metrics_d2"):
        for rank in range(2):
            validated = load_evaluation(pipelined, label, rank)["validated"][0]
            _close(validated["val_label_sum"], labels)
            assert {"val_acc", "val_f1"} <= set(validated)


def _csv_rows(text: str) -> list[dict[str, str]]:
    lines = text.strip().splitlines()
    return [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:]]


def test_checkpoint_early_stopping_lr_monitor_and_loggers_behave_as_on_one_device(tmp_path: Path) -> None:
    from helpers.eval_cases import run_with_callbacks

    run_script("callbacks.py", str(tmp_path), timeout=300)
    run_with_callbacks(tmp_path, "reference", devices=1)
    ref = json.loads((tmp_path / "reference_rank0.json").read_text())
    assert ref["stopped_epoch"] == 1 and ref["epochs_run"] == 2  # early stopping did stop the run
    for rank in range(2):
        ours = json.loads((tmp_path / f"rannc_rank{rank}.json").read_text())
        assert (ours["stopped_epoch"], ours["epochs_run"]) == (ref["stopped_epoch"], ref["epochs_run"])
        assert ours["best_model_path"] == ref["best_model_path"]
        _close(ours["best_model_score"], ref["best_model_score"])
    ours_rows, ref_rows = (
        _csv_rows(json.loads((tmp_path / "rannc_rank0.json").read_text())["csv"]),
        _csv_rows(ref["csv"]),
    )
    assert [sorted(r) for r in ours_rows] == [sorted(r) for r in ref_rows]
    assert {"lr-SGD", "val_loss", "train_loss"} <= set(ref_rows[0])
    for mine, theirs in zip(ours_rows, ref_rows):
        for key, value in theirs.items():
            if value and key not in ("epoch", "step"):
                _close(float(mine[key]), float(value))
            else:
                assert mine[key] == value
