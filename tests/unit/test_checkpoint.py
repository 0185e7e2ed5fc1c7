"""Sharded checkpoint files in one process: the round trip, and what refuses to load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_rannc.errors import RuntimeSetupError
from lightning_rannc.runtime.checkpoint import consolidate, is_sharded, load_sharded, save_sharded


def _checkpoint() -> dict:
    return {
        "state_dict": {"a.weight": torch.arange(6.0).view(2, 3), "a.bias": torch.ones(2)},
        "optimizer_states": [
            {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.full((2, 3), 0.5)}},
             "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        ],
        "global_step": 7,
        "loops": {"fit_loop": {"epoch": 1}},
    }  # fmt: skip


def test_round_trip_restores_integer_optimizer_indices_and_everything_else(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    save_sharded(_checkpoint(), path, is_rank_zero=True)
    assert is_sharded(path) and (path / "meta.pt").is_file()
    loaded = load_sharded(path)
    expected = _checkpoint()
    assert loaded["global_step"] == 7 and loaded["loops"] == expected["loops"]
    torch.testing.assert_close(loaded["state_dict"], expected["state_dict"])
    state = loaded["optimizer_states"][0]
    assert list(state["state"]) == [0] and state["param_groups"] == expected["optimizer_states"][0]["param_groups"]
    torch.testing.assert_close(state["state"][0]["exp_avg"], torch.full((2, 3), 0.5))
    consolidate(path, tmp_path / "one.ckpt")
    one = torch.load(tmp_path / "one.ckpt", weights_only=True)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(2))])
    optimizer.load_state_dict(one["optimizer_states"][0])  # integer keys: the state is applied
    torch.testing.assert_close(
        optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg"], torch.full((2, 3), 0.5)
    )


def test_an_interrupted_or_misplaced_checkpoint_is_refused_with_the_reason(tmp_path: Path) -> None:
    save_sharded(_checkpoint(), tmp_path / "ok", is_rank_zero=True)
    (tmp_path / "ok" / ".metadata").unlink()  # what a crash before the end of the write leaves
    with pytest.raises(RuntimeSetupError, match="no .metadata or meta.pt"):
        load_sharded(tmp_path / "ok")
    (tmp_path / "file.ckpt").write_bytes(b"x")
    with pytest.raises(RuntimeSetupError, match="is a file"):
        save_sharded(_checkpoint(), tmp_path / "file.ckpt", is_rank_zero=True)


def test_a_save_that_fails_half_way_leaves_the_previous_checkpoint_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.ckpt"
    save_sharded(_checkpoint(), path, is_rank_zero=True)
    newer = {**_checkpoint(), "global_step": 8, "state_dict": {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}}

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr("lightning_rannc.runtime.checkpoint.dcp.save", crash)
    with pytest.raises(OSError, match="disk gone"):
        save_sharded(newer, path, is_rank_zero=True)
    loaded = load_sharded(path)
    assert loaded["global_step"] == 7 and torch.equal(loaded["state_dict"]["a.bias"], torch.ones(2))
    monkeypatch.undo()
    save_sharded(newer, path, is_rank_zero=True)  # the next save replaces it whole
    assert load_sharded(path)["global_step"] == 8 and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
