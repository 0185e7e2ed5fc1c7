"""Bring every rank down when one fails, instead of leaving the others blocked in a collective.

Without this, a rank that raises (in capture, planning, a step or a callback) or dies (SIGKILL,
the kernel's OOM killer) leaves the other ranks waiting in a send, a receive or a collective
until the process group's timeout: 30 minutes by default. Here every rank runs a small thread
that talks to the process group's store (the rendezvous ``TCPStore``):

- a rank that raises writes its error there (``report_failure``, from the strategy's
  ``on_exception``); the others see it within ``poll_s``, print one line naming the failed rank
  and exit, so the original traceback is shown once, by the rank that raised;
- each rank bumps a heartbeat counter, and watches its ring neighbour's: a counter that has not
  moved for ``fault_timeout`` seconds means a killed or frozen process, and its watcher reports
  it as failed (one watcher per rank keeps the store traffic flat at any scale);
- the store lives in rank 0's process: losing it means rank 0 is gone, unless this rank is
  finishing anyway;
- a rank stuck in a collective (ranks that disagree on the collectives, a peer whose device
  froze) keeps heartbeating: the watcher also times each training and evaluation step
  (``step``), and a step running past ``stall_limit`` stops every rank, naming the line this
  rank waits at. Without it the process group's ``timeout`` (30 minutes) would end the run, and
  under NCCL's asynchronous error handling without Lightning's ``on_exception``.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from lightning_rannc._compat import thread_frame

__all__ = ["Watchdog", "watched_step", "STALL_FLOOR_S", "STALL_FACTOR"]

log = logging.getLogger("lightning_rannc")

_PREFIX = "lightning_rannc/watchdog"
_GENERATIONS = itertools.count()
"""Each fit in a process starts a new generation of keys, the same on every rank (they run the
same sequence of fits), so a finished run's keys never look like a failure of the next."""
STALL_FLOOR_S = 300.0
"""The shortest automatic stall limit: a step may always run this long."""
STALL_FACTOR = 20.0
"""The automatic stall limit is this many times the median of the recent steps: room for a step
that captures a new batch shape, without waiting half an hour for a stuck one."""
_TIMED_STEPS = 3
"""Steps timed before the automatic limit applies (the first one plans, and may take minutes)."""


class Watchdog:
    """One rank's failure watcher; ``start`` it after the process group exists."""

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        fault_timeout: float,
        stall_timeout: float | None = None,
        poll_s: float = 0.5,
        exit_process: Callable[[int], Any] = os._exit,
        grace_s: float = 10.0,
        generation: int | None = None,
    ) -> None:
        self._store = store
        self._rank = rank
        self._world_size = world_size
        self._fault_timeout = fault_timeout
        self._poll_s = poll_s
        self._exit_process = exit_process
        self._grace_s = grace_s
        self._keys = f"{_PREFIX}/{next(_GENERATIONS) if generation is None else generation}"
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lightning_rannc-watchdog", daemon=True)
        self._stall_timeout = stall_timeout
        self._step: tuple[str, float, int] | None = None
        """The running step: what it is, when it started, the thread running it."""
        self._step_times: collections.deque[float] = collections.deque(maxlen=50)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """The run is over on this rank: stop watching (and never exit the process)."""
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=4 * self._poll_s)

    def report_failure(self, error: BaseException) -> None:
        """Tell every rank that this one failed with ``error``, and decide whether this rank
        shows its traceback (returns) or stops with one line. The error is shown once: by the
        first rank to fail; when every rank raises the same error (a plan that does not fit), by
        rank 0, the user's own process, so that its ``try``/``except`` and loggers see it."""
        self._stopped.set()
        summary = f"{self._rank}\t{type(error).__name__}: {_first_line(error)}"
        try:
            self._store.set(f"{self._keys}/failed_by/{self._rank}", summary)
            first = self._store.add(f"{self._keys}/failures", 1) == 1
            if first:
                self._store.set(f"{self._keys}/failed", summary)
            elif self._rank == 0 and _same_error(self._store.get(f"{self._keys}/failed").decode(), summary):
                self._await_others(summary)
                return
        except Exception:  # the store is gone (rank 0 exited): nobody is left to tell
            return
        if not first:
            self._stop_process(self._store.get(f"{self._keys}/failed").decode(), also=summary)
            return
        if self._rank == 0:
            # Rank 0 shows its own error; the others stop. Its process holds the store: it waits
            # until they have reported or stopped, or a rank raising the same error a moment
            # later would find no store, and show its traceback too.
            self._await_others(summary)
            return
        rank_zero = self._await_rank_zero()
        if rank_zero is not None and _same_error(rank_zero, summary):
            self._stop_process(rank_zero, also=summary)

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Time one step (``what``: "training step 12"): past ``stall_limit``, every rank stops."""
        started = time.monotonic()
        self._step = (what, started, threading.get_ident())
        try:
            yield
        finally:
            self._step = None
            self._step_times.append(time.monotonic() - started)

    def stall_limit(self) -> float | None:
        """Seconds a step may run: ``stall_timeout``, or ``STALL_FACTOR`` x the median of the
        recent steps and at least ``STALL_FLOOR_S`` once a few have run; ``None``: no limit yet."""
        if self._stall_timeout is not None:
            return self._stall_timeout
        if len(self._step_times) < _TIMED_STEPS:
            return None
        return max(STALL_FLOOR_S, STALL_FACTOR * statistics.median(self._step_times))

    def _await_others(self, summary: str) -> None:
        """Rank 0 (whose process holds the store) waits until each other rank has stopped or
        shows an error of its own: a rank that raised the same error a moment later must still
        find the store to learn that rank 0 shows it."""
        deadline = time.monotonic() + max(self._grace_s, 4 * self._poll_s)
        others = [r for r in range(self._world_size) if r != self._rank]
        while others and time.monotonic() < deadline:
            try:
                others = [r for r in others if not self._decided(r, summary)]
            except Exception:
                return
            time.sleep(self._poll_s / 5)

    def _decided(self, rank: int, summary: str) -> bool:
        if self._store.check([f"{self._keys}/stopping/{rank}"]):
            return True
        key = f"{self._keys}/failed_by/{rank}"
        return bool(self._store.check([key])) and not _same_error(self._store.get(key).decode(), summary)

    def _await_rank_zero(self) -> str | None:
        """Rank 0's own failure, once it reports one; ``None`` once it stops because of this
        rank (it then shows nothing) or after the grace period. Under load rank 0 can take
        seconds to report an error every rank raised: a fixed wait showed it twice."""
        deadline = time.monotonic() + max(self._grace_s, 4 * self._poll_s)
        while time.monotonic() < deadline:
            failure = self._rank_zero_failure()
            if failure is not None:
                return failure
            try:
                if self._store.check([f"{self._keys}/stopping/0"]):
                    return None
            except Exception:  # the store lives in rank 0's process: it is gone
                return None
            time.sleep(self._poll_s / 5)
        return None

    def _rank_zero_failure(self) -> str | None:
        key = f"{self._keys}/failed_by/0"
        try:
            return self._store.get(key).decode() if self._store.check([key]) else None
        except Exception:
            return None

    def _watch(self) -> None:
        neighbour = (self._rank + 1) % self._world_size
        last_beat, last_change = -1, time.monotonic()
        while not self._stopped.wait(self._poll_s):
            try:
                self._store.add(f"{self._keys}/beat/{self._rank}", 1)
                if self._store.check([f"{self._keys}/failed"]):
                    return self._stop_process(self._store.get(f"{self._keys}/failed").decode())
                beat = self._store.add(f"{self._keys}/beat/{neighbour}", 0)
            except Exception as error:
                return self._lost_store(error)
            now = time.monotonic()
            if beat != last_beat:
                last_beat, last_change = beat, now
            elif now - last_change > self._fault_timeout:
                return self._silent(neighbour)
            step, limit = self._step, self.stall_limit()
            if step is not None and limit is not None and now - step[1] > limit:
                return self._stalled(step, now - step[1], limit)

    def _stalled(self, step: tuple[str, float, int], seconds: float, limit: float) -> None:
        what, _, thread = step
        summary = (
            f"{self._rank}\t{what} has run for {seconds:.0f} s, over the stall limit of {limit:.0f} s "
            f"(stall_timeout), waiting {_waiting_at(thread)}: a collective that never completes (ranks "
            "that run different collectives, or a peer whose device hangs)"
        )
        try:
            if not self._store.check([f"{self._keys}/failed"]):
                self._store.set(f"{self._keys}/failed", summary)
        except Exception:
            pass
        self._stop_process(summary)

    def _silent(self, neighbour: int) -> None:
        summary = f"{neighbour}\tno sign of life for {self._fault_timeout:.0f} s (killed, crashed or frozen)"
        try:
            self._store.set(f"{self._keys}/failed", summary)
        except Exception:
            pass
        self._stop_process(summary, rank_zero_alive=neighbour != 0)

    def _lost_store(self, error: Exception) -> None:
        # Rank 0 also exits after a run that finished: wait a moment for this rank to finish too.
        if self._stopped.wait(max(self._grace_s, 4 * self._poll_s)):
            return
        self._stop_process(
            f"0\tthe rendezvous store in rank 0's process stopped answering ({error})", rank_zero_alive=False
        )

    def _stop_process(self, failed: str, also: str | None = None, rank_zero_alive: bool = True) -> None:
        if self._stopped.is_set() and also is None:
            return  # this rank finished or reported a failure of its own meanwhile
        rank, _, reason = failed.partition("\t")
        line = f"lightning_rannc: stopping rank {self._rank} because rank {rank} failed: {reason}"
        own = also.partition("\t")[2] if also is not None else reason
        if own != reason:  # not the same error raised on every rank
            line += f" (this rank then failed too: {own})"
        try:  # a rank that failed first waits for this (see _await_rank_zero)
            self._store.set(f"{self._keys}/stopping/{self._rank}", "1")
        except Exception:
            pass
        print(line, file=sys.stderr, flush=True)
        if rank == "0" and self._rank != 0 and rank_zero_alive:
            # Lightning's launcher kills rank 0's process as soon as another rank exits with an
            # error: give rank 0 a moment to show the error it raised.
            time.sleep(4 * self._poll_s)
        self._exit_process(1)


def watched_step(watchdog: Watchdog | None, what: str) -> contextlib.AbstractContextManager[None]:
    """``watchdog.step(what)``, or nothing to watch (one process)."""
    return watchdog.step(what) if watchdog is not None else contextlib.nullcontext()


def _waiting_at(thread: int) -> str:
    """Where ``thread`` is now: its innermost frame, and the innermost in this package (the
    collective's caller) when that is another."""
    frame = thread_frame(thread)
    if frame is None:
        return "at an unknown line"
    frames = traceback.extract_stack(frame)
    innermost = frames[-1]
    ours = next((f for f in reversed(frames) if f"{os.sep}lightning_rannc{os.sep}" in f.filename), None)
    where = f"in {innermost.name} ({innermost.filename}:{innermost.lineno})"
    if ours is not None and ours is not innermost:
        where += f", called from {ours.name} ({ours.filename}:{ours.lineno})"
    return where


def _same_error(one: str, other: str) -> bool:
    """Whether two ``rank\terror`` summaries name the same error (from different ranks)."""
    return one.partition("\t")[2] == other.partition("\t")[2]


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""
