"""A Chrome trace of what each rank really did (RaNNC's ``trace_events``).

``RaNNCStrategy(trace="trace.json")`` records, for the first ``trace_steps`` training steps,
every stage's forward and backward of each micro-batch (``torch.distributed.pipelining``'s
``forward_one_chunk`` / ``backward_one_chunk``), the collectives after the schedule (gradient
average over replicas, tied-weight sum, loss sharing) and the optimizer step. At the end of
``fit`` rank 0 gathers the ranks' events into one file for https://ui.perfetto.dev or
chrome://tracing: one process per rank; gaps in a row are waiting (for a neighbour's
activations or gradients, or for the bubble). Clocks start at a barrier, so rows line up to
within the barrier's skew.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist

__all__ = ["EventTrace"]

_COMPUTE, _OTHER = 0, 1
"""Thread ids: stage compute, and what runs around the schedule."""


class EventTrace:
    """This rank's runtime events (complete events, microseconds since the common start)."""

    def __init__(self, rank: int, max_steps: int) -> None:
        self.rank = rank
        self.max_steps = max_steps
        self.step = 0
        self.events: list[dict[str, Any]] = []
        if dist.is_initialized():
            dist.barrier()  # a common start for every rank's clock
        self._origin = time.perf_counter()

    @property
    def recording(self) -> bool:
        return 1 <= self.step <= self.max_steps

    def start_step(self) -> None:
        self.step += 1

    @contextlib.contextmanager
    def span(self, name: str, category: str, thread: int = _OTHER, **args: Any) -> Iterator[None]:
        if not self.recording:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self._add(name, category, thread, start, time.perf_counter(), {"step": self.step, **args})

    def interval(self, name: str, category: str, start: float, end: float) -> None:
        """An event between two ``time.perf_counter()`` readings."""
        if self.recording:
            self._add(name, category, _OTHER, start, end, {"step": self.step})

    def _add(self, name: str, category: str, thread: int, start: float, end: float, args: dict[str, Any]) -> None:
        start_us = (start - self._origin) * 1e6
        self.events.append(
            {"name": name, "cat": category, "ph": "X", "pid": self.rank, "tid": thread,
             "ts": round(start_us, 1), "dur": round((end - start) * 1e6, 1), "args": args}
        )  # fmt: skip

    def watch_stage(self, stage: Any) -> None:
        """Time ``stage``'s forward and backward of each micro-batch (its first argument)."""
        for method, kind in (("forward_one_chunk", "F"), ("backward_one_chunk", "B")):
            setattr(stage, method, self._timed(getattr(stage, method), kind, stage.stage_index))

    def _timed(self, run: Any, kind: str, stage_index: int) -> Any:
        category = "forward" if kind == "F" else "backward"

        @functools.wraps(run)
        def timed(chunk: int, *args: Any, **kwargs: Any) -> Any:
            with self.span(f"{kind}{chunk}", category, _COMPUTE, micro_batch=chunk, stage=stage_index):
                return run(chunk, *args, **kwargs)

        return timed

    def write(self, path: str | Path) -> None:
        """Gather every rank's events on rank 0 and write them there. Collective."""
        parts: list[list[dict[str, Any]]] = [self.events]
        if dist.is_initialized():
            parts = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(parts, self.events)
        if self.rank != 0:
            return
        events = [event for part in parts for event in part]
        names = [_name_event(rank, f"rank {rank}") for rank in range(len(parts))]
        threads = [_thread_event(rank, tid, label) for rank in range(len(parts)) for tid, label in _THREADS]
        Path(path).write_text(json.dumps({"traceEvents": names + threads + events, "displayTimeUnit": "ms"}))


_THREADS = ((_COMPUTE, "stages (forward/backward)"), (_OTHER, "collectives, optimizer"))


def _name_event(pid: int, name: str) -> dict[str, Any]:
    return {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}}


def _thread_event(pid: int, tid: int, name: str) -> dict[str, Any]:
    return {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}}
