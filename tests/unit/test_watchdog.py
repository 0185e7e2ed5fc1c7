"""The watchdog in one process: two ranks' watchers sharing one store, the process exit faked."""

from __future__ import annotations

import threading
import time

import pytest
import torch.distributed as dist

from lightning_rannc.runtime.watchdog import Watchdog


class _Exits:
    """Records ``exit_process`` calls instead of ending the test process."""

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.called = threading.Event()

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.called.set()


def _pair(store: object, fault_timeout: float = 30.0) -> tuple[Watchdog, Watchdog, _Exits, _Exits]:
    exits = _Exits(), _Exits()
    dogs = [
        Watchdog(store, r, 2, fault_timeout, poll_s=0.05, exit_process=exits[r], grace_s=0.3, generation=0)
        for r in (0, 1)
    ]
    return dogs[0], dogs[1], exits[0], exits[1]


def test_a_rank_that_raises_stops_the_other_with_one_line_naming_it(capfd: pytest.CaptureFixture[str]) -> None:
    rank0, rank1, exit0, exit1 = _pair(dist.HashStore())
    rank0.start(), rank1.start()
    started = time.monotonic()
    rank1.report_failure(ValueError("bad batch\nmore details"))  # returns: its traceback is the one shown
    assert exit0.called.wait(2.0) and exit0.codes == [1]
    assert time.monotonic() - started < 2.0
    assert not exit1.called.is_set()
    err = capfd.readouterr().err
    assert err.count("lightning_rannc: stopping rank 0 because rank 1 failed: ValueError: bad batch\n") == 1
    rank0.stop(), rank1.stop()


def test_a_rank_failing_after_another_says_so_and_exits(capfd: pytest.CaptureFixture[str]) -> None:
    rank0, rank1, exit0, exit1 = _pair(dist.HashStore())
    rank1.report_failure(RuntimeError("first"))
    rank0.report_failure(RuntimeError("connection closed by peer"))
    assert exit0.codes == [1] and exit1.codes == []
    err = capfd.readouterr().err
    assert "rank 1 failed: RuntimeError: first (this rank then failed too: RuntimeError: connection closed" in err


def test_the_same_error_on_every_rank_is_named_once(capfd: pytest.CaptureFixture[str]) -> None:
    rank0, rank1, exit0, _ = _pair(dist.HashStore())
    rank0.report_failure(ValueError("does not fit"))
    rank1.report_failure(ValueError("does not fit"))
    assert capfd.readouterr().err.count("does not fit") == 1


def test_a_silent_rank_is_reported_after_the_fault_timeout(capfd: pytest.CaptureFixture[str]) -> None:
    rank0, _, exit0, _ = _pair(dist.HashStore(), fault_timeout=0.5)
    rank0.start()  # rank 1 never beats: killed before it could
    assert not exit0.called.wait(0.3)
    assert exit0.called.wait(2.0)
    assert "rank 1 failed: no sign of life for 0 s" in capfd.readouterr().err
    rank0.stop()


def test_a_stopped_watchdog_never_exits_the_process() -> None:
    store = dist.HashStore()
    rank0, rank1, exit0, _ = _pair(store, fault_timeout=0.2)
    rank0.start()
    rank0.stop()
    rank1.report_failure(ValueError("late"))
    time.sleep(0.5)
    assert not exit0.called.is_set()


class _GoneStore:
    def add(self, key: str, value: int) -> int:
        raise RuntimeError("Connection refused")


def test_losing_the_store_stops_the_rank_unless_it_is_finishing(capfd: pytest.CaptureFixture[str]) -> None:
    rank1 = Watchdog(_GoneStore(), 1, 2, 30.0, poll_s=0.05, exit_process=(exits := _Exits()), grace_s=0.3)
    rank1.start()
    assert exits.called.wait(2.0)
    assert "because rank 0 failed: the rendezvous store" in capfd.readouterr().err
    finishing = Watchdog(_GoneStore(), 1, 2, 30.0, poll_s=0.05, exit_process=(late := _Exits()), grace_s=0.5)
    finishing.start()
    time.sleep(0.2)
    finishing.stop()  # the run ended here too: rank 0 simply exited first
    time.sleep(0.6)
    assert not late.called.is_set()


def test_an_error_every_rank_raises_is_shown_by_rank_zero(capfd: pytest.CaptureFixture[str]) -> None:
    """Rank 0 is the user's own process: its try/except and loggers must see the error."""
    rank0, rank1, exit0, exit1 = _pair(dist.HashStore())
    first = threading.Thread(target=rank1.report_failure, args=(ValueError("does not fit"),))
    first.start()  # rank 1 gets there first ...
    time.sleep(0.02)
    rank0.report_failure(ValueError("does not fit"))  # ... rank 0 returns: its traceback is shown
    first.join()
    assert exit0.codes == [] and exit1.codes == [1]
    assert "stopping rank 1 because rank 0 failed: ValueError: does not fit\n" in capfd.readouterr().err


def test_a_step_past_the_stall_limit_stops_every_rank_naming_where_it_waits(capfd: pytest.CaptureFixture[str]) -> None:
    """A rank blocked in a collective heartbeats; the step's clock finds it."""
    store, exits = dist.HashStore(), (_Exits(), _Exits())
    dogs = [
        Watchdog(store, r, 2, 30.0, stall_timeout=0.5, poll_s=0.05, exit_process=exits[r], grace_s=0.3, generation=0)
        for r in (0, 1)
    ]
    for dog in dogs:
        dog.start()
    started = time.monotonic()
    with dogs[1].step("training step 7"):
        assert exits[1].called.wait(3.0)  # stands for a collective that never returns
    assert exits[0].called.wait(2.0)
    assert 0.5 <= time.monotonic() - started < 3.0
    err = capfd.readouterr().err
    assert "because rank 1 failed: training step 7 has run for 1 s, over the stall limit of 0 s" in err
    assert "waiting in wait (" in err  # the Event.wait above
    for dog in dogs:
        dog.stop()


def test_the_automatic_stall_limit_follows_the_steps_after_the_first_few() -> None:
    from lightning_rannc.runtime.watchdog import STALL_FACTOR, STALL_FLOOR_S

    dog = Watchdog(dist.HashStore(), 0, 2, 30.0, exit_process=_Exits(), generation=0)
    for _ in range(3):
        assert dog.stall_limit() is None  # the first steps capture and plan: no limit yet
        with dog.step("training step"):
            pass
    assert dog.stall_limit() == STALL_FLOOR_S
    dog._step_times.extend([100.0] * 10)
    assert dog.stall_limit() == STALL_FACTOR * 100.0
