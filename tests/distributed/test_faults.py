"""A failing rank brings every rank down quickly, with its error shown once (gloo, 2 processes).

The collectives' own timeout is 600 s in these runs: finishing within seconds shows that the
watchdog, not a timeout, ended the waiting rank.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from helpers.dist import run_script

pytestmark = pytest.mark.distributed


def _fail(mode: str) -> tuple[str, float]:
    started = time.monotonic()
    result = run_script("faulty_run.py", mode, timeout=120, check=False)
    elapsed = time.monotonic() - started
    assert result.returncode != 0, result.stdout[-3000:]
    assert "finished" not in result.stdout
    return result.stdout, elapsed


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("raise_step", "ValueError: injected failure on rank 1"),
        ("raise_setup", "ValueError: injected failure in setup on rank 1"),
        ("too_big", "PlanError: The model does not fit on 2 device(s)"),
    ],
)
def test_a_rank_that_raises_stops_every_rank_and_its_error_shows_once(mode: str, message: str) -> None:
    out, elapsed = _fail(mode)
    assert elapsed < 60, out[-3000:]
    assert out.count(message) == 2, out[-3000:]  # the traceback's last line, and the one-line notice
    assert out.count("Traceback (most recent call last)") == 1, out[-3000:]
    assert f"because rank {1 - int(mode == 'too_big')} failed: " + message.split(":")[0] in out


def test_a_killed_rank_stops_the_others_within_the_fault_timeout() -> None:
    out, elapsed = _fail("kill")
    assert elapsed < 60, out[-3000:]  # fault_timeout is 15 s; the collectives would wait 600 s


def test_a_rank_stuck_in_a_collective_stops_every_rank_within_the_stall_limit() -> None:
    """A rank waiting in a collective is alive: only the step's own clock shows it is stuck."""
    out, elapsed = _fail("stuck")
    assert elapsed < 60, out[-3000:]  # stall_timeout is 5 s; the collectives would wait 600 s
    assert "because rank 0 failed: training step 3 has run for" in out, out[-3000:]
    assert "over the stall limit of 5 s (stall_timeout), waiting in " in out, out[-3000:]


def test_after_a_sigkill_resuming_from_last_continues_as_if_nothing_happened(tmp_path: Path) -> None:
    run_script("killed_and_resumed.py", str(tmp_path / "straight"), "straight", timeout=180)
    killed = tmp_path / "killed"
    started = time.monotonic()
    result = run_script("killed_and_resumed.py", str(killed), "killed", timeout=180, check=False)
    assert result.returncode != 0 and time.monotonic() - started < 60
    assert (killed / "ckpt" / "last.ckpt").is_file()  # written at step 4, before the kill
    run_script("killed_and_resumed.py", str(killed), "resumed", timeout=180)
    straight = json.loads((tmp_path / "straight" / "straight.json").read_text())
    resumed = json.loads((killed / "resumed.json").read_text())
    assert len(straight["losses"]) == 8 and len(resumed["losses"]) == 4
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(straight["losses"][4:]), rtol=1e-6, atol=0)
    for key, value in straight["weights"].items():
        torch.testing.assert_close(torch.tensor(resumed["weights"][key]), torch.tensor(value), rtol=1e-6, atol=0)
