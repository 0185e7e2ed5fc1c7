"""A failing rank brings every rank down quickly, with its error shown once (gloo, 2 processes).

The collectives' own timeout is 600 s in these runs: finishing within seconds shows that the
watchdog, not a timeout, ended the waiting rank.
"""

from __future__ import annotations

import time

import pytest

from _dist import run_script

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
