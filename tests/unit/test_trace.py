"""How the runtime trace times sends and receives (``EventTrace.watch_stage`` / ``watch_schedule``),
on stand-ins for a pipeline stage and schedule: this module plays the part of torch's
``schedules.py``, whose ``_batch_p2p`` and ``_wait_batch_p2p`` the trace swaps during a step; and
the file it writes, read back as ``show --measured`` reads it (``report.measured``)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from lightning_rannc.report.measured import read_measured_step
from lightning_rannc.runtime.trace import EventTrace, RankEvents, on_host_clocks


class _Work:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def wait(self) -> None:
        time.sleep(0.002)
        self.log.append(f"waited {self.name}")


class _Op:
    def __init__(self, name: str) -> None:
        self.name = name


def _batch_p2p(ops: list[_Op], desc: str | None = None) -> list[_Work]:
    return [_Work(_done, op.name) for op in ops]


def _wait_batch_p2p(works: list[_Work]) -> None:
    for work in works:
        work.wait()


_done: list[str] = []
_ORIGINALS = (_batch_p2p, _wait_batch_p2p)


class _Stage:
    stage_index = 1

    def forward_one_chunk(self, chunk: int) -> None:
        _done.append(f"F{chunk}")

    def backward_one_chunk(self, chunk: int) -> None:
        _done.append(f"B{chunk}")

    def get_fwd_recv_ops(self, chunk: int) -> list[_Op]:
        return [_Op(f"activation {chunk}.{k}") for k in range(2)]  # two tensors: one event

    def get_fwd_send_ops(self, chunk: int) -> list[_Op]:
        return [_Op(f"output {chunk}")]

    def get_bwd_recv_ops(self, chunk: int) -> list[_Op]:
        return [_Op(f"gradient {chunk}")]

    def get_bwd_send_ops(self, chunk: int) -> list[_Op]:
        return [_Op(f"input gradient {chunk}")]


class _Schedule:
    """Two micro-batches the way ``Schedule1F1B`` runs a middle stage."""

    def __init__(self, stage: _Stage) -> None:
        self.stage = stage

    def step(self) -> None:
        self._step_microbatches()

    def _step_microbatches(self) -> None:
        stage = self.stage
        _wait_batch_p2p(_batch_p2p(stage.get_fwd_recv_ops(0)))
        for m in range(2):
            stage.forward_one_chunk(m)
            sends = _batch_p2p(stage.get_fwd_send_ops(m))
            _wait_batch_p2p(_batch_p2p(stage.get_bwd_recv_ops(m)))
            _wait_batch_p2p(sends)
            stage.backward_one_chunk(m)
            _wait_batch_p2p(_batch_p2p(stage.get_bwd_send_ops(m) + stage.get_fwd_recv_ops(m + 1)))
        _wait_batch_p2p(_batch_p2p([_Op("not the stage's")]))  # not named by a watched stage: untimed


def _traced(max_steps: int) -> tuple[EventTrace, _Schedule]:
    trace, stage = EventTrace(rank=0, max_steps=max_steps), _Stage()
    schedule = _Schedule(stage)
    trace.watch_stage(stage)
    trace.watch_schedule(schedule)
    trace.watch_schedule(schedule)  # once per stage in the runtime: the second call does nothing
    return trace, schedule


def test_each_wait_is_one_event_named_by_its_operations() -> None:
    trace, schedule = _traced(max_steps=1)
    trace.start_step()
    schedule.step()
    names = [e["name"] for e in trace.events]
    assert names == [
        "recv F0", "F0", "recv B0", "send F0", "B0", "send B0 + recv F1",
        "F1", "recv B1", "send F1", "B1", "send B1 + recv F2",
    ]  # fmt: skip
    transfers = [e for e in trace.events if e["cat"] == "communication"]
    assert all(e["tid"] == 0 and e["args"]["stages"] == [1] and e["args"]["step"] == 1 for e in transfers)
    assert transfers[-1]["args"]["ops"] == ["send B1", "recv F2"] and transfers[-1]["args"]["op_stages"] == [1, 1]
    assert all(e["dur"] >= 1500 * len(e["args"]["ops"]) for e in transfers[:2])  # the waits themselves (2 ms each)
    assert (_batch_p2p, _wait_batch_p2p) == _ORIGINALS  # put back after the step
    assert _done[-1] == "waited not the stage's"


def test_steps_past_trace_steps_run_untouched() -> None:
    trace, schedule = _traced(max_steps=1)
    trace.start_step()
    schedule.step()
    recorded = len(trace.events)
    trace.start_step()
    swapped: list[Any] = []
    schedule._step_microbatches = lambda: swapped.append(globals()["_wait_batch_p2p"])  # type: ignore[method-assign]
    schedule.step()
    assert swapped == [_ORIGINALS[1]] and len(trace.events) == recorded


def test_a_schedule_without_the_helpers_is_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    class Elsewhere:
        def step(self) -> None:
            pass

        _step_microbatches = staticmethod(len)  # a builtin: no module globals to swap

    trace, schedule = EventTrace(rank=0, max_steps=1), Elsewhere()
    step = schedule.step
    with caplog.at_level(logging.DEBUG, logger="lightning_rannc"):
        trace.watch_schedule(schedule)
        trace.watch_stage(type("Bare", (), {"stage_index": 0, "forward_one_chunk": _Stage.forward_one_chunk,
                                            "backward_one_chunk": _Stage.backward_one_chunk})())  # fmt: skip
    assert schedule.step == step
    messages = [r.getMessage() for r in caplog.records]
    assert any("no send/recv events: Elsewhere's module has no _batch_p2p / _wait_batch_p2p" in m for m in messages)
    assert any("no send/recv events: the stage has no get_fwd_recv_ops" in m for m in messages)


def test_written_trace_names_each_row_and_is_read_back_step_by_step(tmp_path: Path) -> None:
    trace = EventTrace(rank=0, max_steps=2)
    for _ in range(3):  # the third step is past max_steps: not recorded
        trace.start_step()
        with trace.span("F0", "forward", 0, micro_batch=0, stage=0):
            time.sleep(0.002)
        trace.interval("optimizer step", "optimizer", time.perf_counter(), time.perf_counter())
    trace.write(tmp_path / "run.json")
    data = json.loads((tmp_path / "run.json").read_text())
    assert set(data) == {"traceEvents", "displayTimeUnit"} and data["displayTimeUnit"] == "ms"
    names = [(e["name"], e["pid"], e["tid"], e["args"]) for e in data["traceEvents"] if e["ph"] == "M"]
    assert names == [
        ("process_name", 0, 0, {"name": "rank 0", "clock": 0}),
        ("thread_name", 0, 0, {"name": "schedule (forward/backward, send/recv)"}),
        ("thread_name", 0, 1, {"name": "collectives, optimizer"}),
    ]
    boxes = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert [(e["name"], e["cat"], e["tid"], e["args"]["step"]) for e in boxes] == [
        ("F0", "forward", 0, 1), ("optimizer step", "optimizer", 1, 1),
        ("F0", "forward", 0, 2), ("optimizer step", "optimizer", 1, 2),
    ]  # fmt: skip
    assert all(e["pid"] == 0 and e["ts"] == round(e["ts"], 1) and e["dur"] == round(e["dur"], 1) for e in boxes)
    measured = read_measured_step(tmp_path / "run.json")
    assert measured.steps == [1, 2] and measured.step == 2 and list(measured.rows) == [0]
    [(kind, microbatch, start_ms, end_ms)] = measured.operations(0)
    assert (kind, microbatch, start_ms) == ("F", 0, 0.0) and end_ms >= 2.0
    assert [e.name for e in measured.rows[0]] == ["F0", "optimizer step"]


def test_ranks_of_one_host_are_written_on_its_clock() -> None:
    """Each rank's clock starts as it leaves a barrier, milliseconds apart from the others';
    ranks of one host share its monotonic clock, which puts them on one timeline exactly."""

    def part(host: str, origin_s: float, *starts_us: float) -> RankEvents:
        return RankEvents(
            [{"name": "F0", "ph": "X", "pid": 0, "ts": ts, "dur": 1.0} for ts in starts_us], host, origin_s
        )

    parts = [part("a", 10.002, 0.0, 50.0), part("b", 3.0, 7.0), part("a", 10.0, 0.0), part("b", 3.0005, 1.0)]
    events, clocks = on_host_clocks(parts)
    assert clocks == [0, 1, 0, 1]  # host a, which rank 0 is on, first
    # each rank moved to its host's earliest start: rank 0 left the barrier 2 ms after rank 2
    assert [e["ts"] for e in events] == [2000.0, 2050.0, 7.0, 0.0, 501.0]
    assert all(e["ts"] >= 0 for e in events)
