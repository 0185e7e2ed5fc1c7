"""A Chrome trace of what each rank really did (RaNNC's ``trace_events``).

``RaNNCStrategy(trace="trace.json")`` records, for the first ``trace_steps`` training steps,
every stage's forward and backward of each micro-batch (``torch.distributed.pipelining``'s
``forward_one_chunk`` / ``backward_one_chunk``), the point-to-point transfers between them
(``send F3``: this stage's activations of micro-batch 3 going out; ``recv B2``: the gradients of
micro-batch 2 coming in), the collectives after the schedule (gradient average over replicas,
tied-weight sum, loss sharing) and the optimizer step. At the end of ``fit`` rank 0 gathers the
ranks' events into one file for https://ui.perfetto.dev or chrome://tracing: one process per
rank; a ``recv`` event is the time spent waiting for a neighbour, the remaining gaps are the
schedule's own (the bubble) or Lightning's. Each rank's clock starts as it leaves a barrier, and
ranks leave one milliseconds apart; ranks on one host share its monotonic clock, so the written
trace puts them on one timeline exactly. Ranks on other hosts keep their own clock, and are
aligned by their sends and receives when the trace is read (``report.measured.clock_offsets``).
On a GPU, spans are timed with CUDA events on the device's timeline (host
time would show a queued kernel, and a ``recv`` would read about zero), resolved once, when the
trace is written: no step waits for the GPU because it is traced.

The transfers are timed where the schedule waits for them: ``torch.distributed.pipelining``
posts the stage's ``get_*_send_ops`` / ``get_*_recv_ops`` through its module-level
``_batch_p2p`` and waits in ``_wait_batch_p2p``. Both helpers are private to torch, so they are
replaced only while a recorded step runs, and only when the schedule's module has them (torch
2.11 and 2.13 do); otherwise the trace has no send/recv events (logged at debug level).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from lightning_rannc._compat import replaced_schedule_p2p, schedule_p2p_helpers
from lightning_rannc.report.chrome_trace import (
    complete_event,
    process_name_event,
    thread_name_event,
    write_chrome_trace,
)
from lightning_rannc.runtime.mesh import barrier

__all__ = ["EventTrace", "RankEvents", "on_host_clocks"]

log = logging.getLogger("lightning_rannc")

_COMPUTE, _OTHER = 0, 1
"""Thread ids: the schedule (compute and its transfers), and what runs around it."""
_P2P_GETTERS = (
    ("get_fwd_recv_ops", "recv F"),
    ("get_fwd_send_ops", "send F"),
    ("get_bwd_recv_ops", "recv B"),
    ("get_bwd_send_ops", "send B"),
)
_TAG = "_lightning_rannc_p2p"
"""Attribute a watched stage sets on the ``P2POp`` objects it hands out: ``(label, stage_index)``."""
_WATCHED = "_lightning_rannc_traced"
"""Attribute set on a schedule ``watch_schedule`` has seen."""


class EventTrace:
    """This rank's runtime events (complete events, microseconds since the common start)."""

    def __init__(self, rank: int, max_steps: int, device: torch.device | None = None) -> None:
        self.rank = rank
        self.max_steps = max_steps
        self.step = 0
        self._events: list[dict[str, Any]] = []
        self._pending: list[tuple[str, str, int, Any, Any, dict[str, Any]]] = []
        if dist.is_initialized():
            barrier(device or torch.device("cpu"))  # a common start for every rank's clock
        self._origin = time.perf_counter()
        # read next to the origin: perf_counter need not be one clock across processes, monotonic is on a host
        self._host_origin = time.monotonic()
        self._clock = _CudaClock(device) if device is not None and device.type == "cuda" else None

    @property
    def events(self) -> list[dict[str, Any]]:
        """The recorded events (on a GPU this waits for it once, to read the CUDA events)."""
        if self._pending:
            assert self._clock is not None
            self._clock.synchronize()
            for name, category, thread, start, end, args in self._pending:
                start_s, end_s = (self._origin + self._clock.seconds(mark) for mark in (start, end))
                self._add(name, category, thread, start_s, end_s, args)
            self._pending.clear()
        return self._events

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
        args = {"step": self.step, **args}
        if self._clock is not None:
            start = self._clock.mark()
            try:
                yield
            finally:
                self._pending.append((name, category, thread, start, self._clock.mark(), args))
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self._add(name, category, thread, start, time.perf_counter(), args)

    def interval(self, name: str, category: str, start: float, end: float) -> None:
        """An event between two ``time.perf_counter()`` readings (host time, also on a GPU)."""
        if self.recording:
            self._add(name, category, _OTHER, start, end, {"step": self.step})

    def _add(self, name: str, category: str, thread: int, start: float, end: float, args: dict[str, Any]) -> None:
        # 0.1 us is finer than anything the trace shows, and keeps the file of many steps small
        self._events.append(
            complete_event(
                name,
                category,
                pid=self.rank,
                tid=thread,
                start_us=(start - self._origin) * 1e6,
                duration_us=(end - start) * 1e6,
                args=args,
                decimals=1,
            )
        )

    def watch_stage(self, stage: Any) -> None:
        """Time ``stage``'s forward and backward of each micro-batch (its first argument), and
        name its point-to-point operations for ``watch_schedule``."""
        # backward_weight_one_chunk: the weight gradients zero-bubble schedules run apart
        for method, kind in (
            ("forward_one_chunk", "F"),
            ("backward_one_chunk", "B"),
            ("backward_weight_one_chunk", "W"),
        ):
            if hasattr(stage, method):
                setattr(stage, method, self._timed(getattr(stage, method), kind, stage.stage_index))
        missing = [method for method, _ in _P2P_GETTERS if not hasattr(stage, method)]
        if missing:
            log.debug("The runtime trace has no send/recv events: the stage has no %s.", ", ".join(missing))
            return
        for method, prefix in _P2P_GETTERS:
            setattr(stage, method, self._tagging(getattr(stage, method), prefix, stage.stage_index))

    def watch_schedule(self, schedule: Any) -> None:
        """Time the waits for the sends and receives of the stages ``watch_stage`` watches, inside
        ``schedule.step``. A second call for the same schedule does nothing."""
        if getattr(schedule, _WATCHED, False):
            return
        setattr(schedule, _WATCHED, True)
        helpers = schedule_p2p_helpers(schedule)
        if helpers is None:
            log.debug(
                "The runtime trace has no send/recv events: %s's module has no _batch_p2p / _wait_batch_p2p "
                "(torch internals differ).",
                type(schedule).__name__,
            )
            return
        step = schedule.step
        post, wait = helpers

        @functools.wraps(step)
        def traced_step(*args: Any, **kwargs: Any) -> Any:
            if not self.recording:
                return step(*args, **kwargs)
            with replaced_schedule_p2p(schedule, self._posting(post), self._waiting(wait)):
                return step(*args, **kwargs)

        schedule.step = traced_step

    def _timed(self, run: Any, kind: str, stage_index: int) -> Any:
        category = "forward" if kind == "F" else "backward"

        @functools.wraps(run)
        def timed(chunk: int, *args: Any, **kwargs: Any) -> Any:
            with self.span(f"{kind}{chunk}", category, _COMPUTE, micro_batch=chunk, stage=stage_index):
                return run(chunk, *args, **kwargs)

        return timed

    def _tagging(self, get_ops: Any, prefix: str, stage_index: int) -> Any:
        @functools.wraps(get_ops)
        def tagged(chunk: int, *args: Any, **kwargs: Any) -> Any:
            ops = get_ops(chunk, *args, **kwargs)
            if self.recording:
                for op in ops:
                    with contextlib.suppress(AttributeError):  # a P2POp with __slots__ stays untimed
                        setattr(op, _TAG, (f"{prefix}{chunk}", stage_index))
            return ops

        return tagged

    def _posting(self, batch_p2p: Callable[..., Any]) -> Callable[..., Any]:
        """``_batch_p2p`` whose works remember the names of the operations they carry."""

        def posted(ops: Any, *args: Any, **kwargs: Any) -> Any:
            works = batch_p2p(ops, *args, **kwargs)
            tags = [tag for tag in (getattr(op, _TAG, None) for op in ops) if tag is not None]
            return _TaggedWorks(works, tags) if tags and isinstance(works, list) else works

        return posted

    def _waiting(self, wait_batch_p2p: Callable[..., Any]) -> Callable[..., Any]:
        """``_wait_batch_p2p`` timed as one event named by its operations, e.g. ``send F3 + recv B1``."""

        def waited(works: Any, *args: Any, **kwargs: Any) -> Any:
            tags = getattr(works, "tags", None)
            if not tags:
                return wait_batch_p2p(works, *args, **kwargs)
            pairs = list(dict.fromkeys(tags))  # a micro-batch's several tensors share a label
            labels, op_stages = [label for label, _ in pairs], [stage for _, stage in pairs]
            stages = sorted(set(op_stages))
            with self.span(
                " + ".join(labels), "communication", _COMPUTE, ops=labels, op_stages=op_stages, stages=stages
            ):
                return wait_batch_p2p(works, *args, **kwargs)

        return waited

    def write(self, path: str | Path, group: Any = None) -> None:
        """Gather every rank's events on rank 0 and write them there, ranks of one host on its
        clock. ``group``: a CPU (gloo) group over every rank (``ProcessGroups.cpu_group``;
        ``None``: the default group). Collective."""
        part = RankEvents(self.events, _host(), self._host_origin)
        parts = [part]
        if dist.is_initialized():
            parts = [part] * dist.get_world_size()
            dist.all_gather_object(parts, part, group=group)
        if self.rank != 0:
            return
        events, clocks = on_host_clocks(parts)
        names = [process_name_event(rank, f"rank {rank}", clock=clock) for rank, clock in enumerate(clocks)]
        threads = [thread_name_event(rank, tid, label) for rank in range(len(parts)) for tid, label in _THREADS]
        write_chrome_trace(path, names + threads + events)


class RankEvents(NamedTuple):
    """One rank's recorded events, its host, and its origin on that host's monotonic clock (s)."""

    events: list[dict[str, Any]]
    host: str
    origin: float


def on_host_clocks(parts: Sequence[RankEvents]) -> tuple[list[dict[str, Any]], list[int]]:
    """The ranks' events (``parts[rank]``), each rank's times moved to the earliest origin among
    the ranks of its host, and each rank's clock: the index of its host in order of first rank.
    Ranks with one clock line up exactly; between clocks only messages can tell (``clock_offsets``)."""
    hosts = list(dict.fromkeys(part.host for part in parts))
    earliest = {host: min(part.origin for part in parts if part.host == host) for host in hosts}
    events = []
    for part in parts:
        shift_us = (part.origin - earliest[part.host]) * 1e6
        events += [{**event, "ts": round(event["ts"] + shift_us, 1)} for event in part.events]
    return events, [hosts.index(part.host) for part in parts]


def _host() -> str:
    """What tells this machine's monotonic clock from another's: the host name and, where
    Linux gives one, the boot id (two containers of one name on two machines differ in it)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


_THREADS = ((_COMPUTE, "schedule (forward/backward, send/recv)"), (_OTHER, "collectives, optimizer"))


class _CudaClock:
    """Marks on the GPU's timeline: CUDA events recorded on the current stream, read as seconds
    since an origin event recorded with the host origin (after the common barrier)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.origin = self.mark()

    def mark(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def seconds(self, mark: Any) -> float:
        return self.origin.elapsed_time(mark) / 1e3


class _TaggedWorks(list):  # type: ignore[type-arg]
    """The works of one ``_batch_p2p`` call and the ``(label, stage_index)`` of its operations."""

    def __init__(self, works: list[Any], tags: list[tuple[str, int]]) -> None:
        super().__init__(works)
        self.tags = tags
