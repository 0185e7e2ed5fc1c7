"""Chrome trace and PNG chart of a planned step (``lightning_rannc.report``, ``plan --chart/--trace``),
and the chart of a predicted step above a measured one (``show --chart --measured``)."""

from __future__ import annotations

import dataclasses
import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from lightning_rannc.__main__ import main
from lightning_rannc.errors import PlanError
from lightning_rannc.plan.cost_model import BlockCost
from lightning_rannc.plan.devices import DeviceSpec
from lightning_rannc.plan.memory import TensorTable
from lightning_rannc.plan.plan import PartitionPlan
from lightning_rannc.plan.report import format_plan
from lightning_rannc.plan.search import SearchResult, SearchSettings, search_plan
from lightning_rannc.plan.simulate import ScheduleTimes, plan_action_ms, simulate_plan
from lightning_rannc.report.chart import write_chart, write_comparison_chart
from lightning_rannc.report.chrome_trace import write_trace
from lightning_rannc.report.compare import compare_with_trace, comparison_text
from lightning_rannc.report.measured import read_measured_step

from helpers.devices import test_device

ROOT = Path(__file__).resolve().parents[2]
TARGET = f"{ROOT / 'benchmarks' / 'models.py'}:GPTLM"
SMALL = json.dumps({"layers": 4, "hidden": 256, "heads": 4, "seq_len": 128, "vocab": 1000, "batch_size": 4})
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MATPLOTLIB_MODULES = ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg")

DEVICE = test_device(10**10)


def _search(
    schedule: str,
    replicas: int,
    stages: int = 3,
    microbatches: int = 4,
    device: DeviceSpec = DEVICE,
    zero_bubble: bool = False,
) -> SearchResult:
    """A chain of 6 uneven blocks (so that stages wait on each other) split ``stages`` ways."""
    blocks = [
        BlockCost(
            start=k,
            end=k + 1,
            fwd_ms=1.0 + k % 3,
            bwd_ms=2.0 + k % 3 * 2,
            activation_bytes=10**6,
            cut_bytes=10**6,
            tensor_names=(f"w{k}",),
            module_paths=(f"layers.{k}",),
        )
        for k in range(6)
    ]
    sizes = {f"w{k}": 10**7 for k in range(6)}
    settings = SearchSettings(
        num_devices=stages * replicas,
        global_batch_size=replicas * microbatches,
        device=device,
        pipeline_stages=stages,
        replicas=replicas,
        micro_batches=microbatches,
        schedule=schedule,
        zero_bubble=zero_bubble,  # the schedule named
    )
    tensors = TensorTable(sizes, {n: b // 4 for n, b in sizes.items()}, frozenset(sizes))
    return search_plan(
        blocks, reference_microbatch_size=1, settings=settings, tensors=tensors, graph_fingerprint="test"
    )


def _trace(result: SearchResult, tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "trace.json"
    write_trace(result.plan, result.times, path)
    events: list[dict[str, Any]] = json.loads(path.read_text())["traceEvents"]
    return events


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.parametrize(("schedule", "replicas"), [("gpipe", 2), ("1f1b", 2), ("1f1b", 1)])
def test_trace_events_are_the_simulated_operations(schedule: str, replicas: int, tmp_path: Path) -> None:
    result = _search(schedule, replicas)
    plan, times = result.plan, result.times
    assert plan.schedule == schedule and plan.num_replicas == replicas and plan.num_stages == 3
    events = _trace(result, tmp_path)
    work = [e for e in events if e["ph"] == "X" and e["cat"] in ("forward", "backward")]
    expected = {(s, f"{k}{m}") for s in range(3) for k in "FB" for m in range(4)}
    assert len(work) == len(expected) == 24 and {(e["tid"], e["name"]) for e in work} == expected
    by_key = {(e["tid"], e["name"]): e for e in work}
    for stage, operations in enumerate(times.operations):
        for kind, microbatch, start, end in operations:
            event = by_key[(stage, f"{kind}{microbatch}")]
            assert event["ts"] == pytest.approx(start * 1e3, abs=1e-3)
            assert event["ts"] + event["dur"] == pytest.approx(end * 1e3, abs=1e-3)
            assert event["args"]["micro_batch"] == microbatch and event["args"]["modules"]


@pytest.mark.parametrize(("schedule", "replicas"), [("gpipe", 2), ("1f1b", 1)])
def test_trace_rows_never_overlap_and_end_with_the_update(schedule: str, replicas: int, tmp_path: Path) -> None:
    result = _search(schedule, replicas)
    plan, times = result.plan, result.times
    events = _trace(result, tmp_path)
    ends = []
    for stage in range(plan.num_stages):
        row = sorted((e for e in events if e["ph"] == "X" and e["tid"] == stage), key=lambda e: e["ts"])
        assert row[0]["ts"] >= 0 and all(a["ts"] + a["dur"] <= b["ts"] + 1e-6 for a, b in zip(row, row[1:]))
        ends.append(row[-1]["ts"] + row[-1]["dur"])
    assert max(ends) == pytest.approx(plan.predicted_step_ms * 1e3)
    exchanges = [e for e in events if e["ph"] == "X" and e["cat"] == "exchange"]
    if replicas == 1:
        assert plan.predicted_exchange_ms == 0 and not exchanges
    else:
        assert plan.predicted_exchange_ms > 0 and sorted(e["tid"] for e in exchanges) == [0, 1, 2]
        assert all(e["ts"] == pytest.approx(times.makespan_ms * 1e3, abs=1e-3) for e in exchanges)
    updates = [e for e in events if e["ph"] == "X" and e["cat"] == "update"]
    assert plan.predicted_update_ms > 0 and len(updates) == plan.num_stages
    update_start = (times.makespan_ms + plan.predicted_exchange_ms) * 1e3
    assert all(e["ts"] == pytest.approx(update_start, abs=1e-3) for e in updates)


def test_trace_metadata_names_each_stage(tmp_path: Path) -> None:
    result = _search("1f1b", 2)
    events = _trace(result, tmp_path)
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    for stage in result.plan.stages:
        assert names[stage.stage_index] == f"stage {stage.stage_index} (ranks {stage.ranks}) {stage.module_span}"
    assert names[0].startswith("stage 0 (ranks [0, 3]) layers.0")
    process = [e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"]
    assert process == ["pipeline: 3 stage(s) x 2 replica(s), 4 micro-batch(es) of 1, 1f1b"]


def test_times_of_another_plan_are_refused(tmp_path: Path) -> None:
    result = _search("gpipe", 1)
    other = ScheduleTimes(makespan_ms=1.0, busy_ms=[1.0], operations=[[("F", 0, 0.0, 1.0)]])
    with pytest.raises(PlanError, match="have 1 row"):
        write_trace(result.plan, other, tmp_path / "trace.json")
    assert not (tmp_path / "trace.json").exists()


def test_chart_is_a_png_of_the_figure_size(tmp_path: Path) -> None:
    result = _search("1f1b", 2)
    path = tmp_path / "chart.png"
    write_chart(result.plan, result.times, path, title="Chain")
    assert _png_size(path) == (1320, round((1.6 + 0.5 * 3) * 110))
    assert 10_000 < path.stat().st_size < 1_000_000


def test_plan_cli_writes_chart_and_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chart, trace = tmp_path / "step.png", tmp_path / "step.json"
    args = ["plan", TARGET, "--init-args", SMALL, "--devices", "2", "--batch-size", "8", "--stages", "2"]
    args += ["--micro-batches", "4", "--schedule", "1f1b", "--no-zero-bubble"]
    assert main([*args, "--chart", str(chart), "--trace", str(trace)]) == 0
    printed = capsys.readouterr().out
    assert printed.index("predicted step") < printed.index(f"wrote {chart}") < printed.index(f"wrote {trace}")
    assert _png_size(chart)[0] == 1320 and chart.stat().st_size > 10_000
    events = json.loads(trace.read_text())["traceEvents"]
    per_stage = [f"{k}{m}" for k in "FB" for m in range(4)]
    expected = [*per_stage, "optimizer step"] * 2  # 2 stages, no exchange
    assert sorted(e["name"] for e in events if e["ph"] == "X") == sorted(expected)


def test_missing_matplotlib_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in MATPLOTLIB_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    result = _search("gpipe", 1)
    with pytest.raises(PlanError, match=r'pip install "lightning-rannc\[chart\]"'):
        write_chart(result.plan, result.times, tmp_path / "chart.png")
    write_trace(result.plan, result.times, tmp_path / "trace.json")  # needs no matplotlib
    assert not (tmp_path / "chart.png").exists() and (tmp_path / "trace.json").stat().st_size > 0
    assert main(["plan", TARGET, "--init-args", SMALL, "--devices", "2", "--chart", str(tmp_path / "c.png")]) == 2
    captured = capsys.readouterr()
    assert 'pip install "lightning-rannc[chart]"' in captured.err
    assert captured.out == ""  # refused before planning


def test_an_output_folder_that_does_not_exist_is_refused_before_planning(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", TARGET, "--devices", "2", "--trace", "/no/such/folder/trace.json"]) == 2
    captured = capsys.readouterr()
    assert "its folder does not exist" in captured.err and captured.out == ""


# A saved plan drawn again (show --chart) and compared with a runtime trace (--measured) ------------


@pytest.mark.parametrize(
    ("schedule", "replicas", "stages"), [("gpipe", 2, 3), ("1f1b", 1, 3), ("interleaved_1f1b", 1, 2)]
)
def test_a_saved_plan_replays_the_schedule_it_was_searched_with(schedule: str, replicas: int, stages: int) -> None:
    slow_links = dataclasses.replace(DEVICE, action_overhead_ms=0.5, intra_node_bandwidth=2e8)
    result = _search(schedule, replicas, stages=stages, device=slow_links)
    saved = PartitionPlan.from_json(result.plan.to_json())
    assert saved.predicted_action_overhead_ms == 0.5 and saved.stages[0].send_ms > 0 == saved.stages[-1].send_ms
    replayed = simulate_plan(saved)
    assert replayed.makespan_ms == pytest.approx(result.times.makespan_ms)
    for ours, searched in zip(replayed.operations, result.times.operations, strict=True):
        assert [op[:2] for op in ours] == [op[:2] for op in searched]
        assert _times(ours) == pytest.approx(_times(searched))
    # a plan saved before these fields existed replays without links or overheads: a shorter step
    old = dataclasses.replace(saved, predicted_action_overhead_ms=0.0)
    old.stages = [dataclasses.replace(stage, send_ms=0.0) for stage in saved.stages]
    assert simulate_plan(old).makespan_ms < replayed.makespan_ms - 1.0


def _times(operations: list[tuple[Any, ...]]) -> list[float]:
    """The start and end times of ``(kind, micro-batch, start, end)`` operations, as one flat
    list: pytest.approx compares flat sequences only (pytest >= 9.2 refuses nested ones)."""
    return [float(time) for operation in operations for time in operation[2:]]


def _runtime_trace(
    result: SearchResult,
    path: Path,
    steps: int = 3,
    gradient_receives: bool = False,
    clock_ahead_ms: dict[int, float] | None = None,
    sends_first: bool = False,
    clocks: dict[int, int] | None = None,
) -> Path:
    """What ``RaNNCStrategy(trace=...)`` writes for ``result``'s plan, had every step run as
    simulated (step 1 twice as slow, as warm-up is): forwards and backwards on thread 0, a
    receive before each forward of a later stage (and with ``gradient_receives`` before each
    input gradient of an earlier one), the gradient average on thread 1; each rank's times
    ``clock_ahead_ms`` later than they ran (its clock set to 0 at another moment). With
    ``sends_first``, each receive is waited on together with a send before it, as ``Schedule1F1B``
    does (``send F2 + recv B1``), in a trace from before ``op_stages`` (the wait's one stage).
    ``clocks``: each rank's clock, as the runtime names them (ranks of one host share one)."""
    events: list[dict[str, Any]] = []
    plan, times = result.plan, result.times
    for rank in range(plan.world_size):
        clock = {"clock": clocks[rank]} if clocks is not None else {}
        events.append(
            {"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"} | clock}
        )
    for step in range(1, steps + 1):
        slow = 2.0 if step == 1 else 1.0
        for rank in range(plan.world_size):
            stage = plan.stage_of_rank(rank).stage_index
            offset_ms = 1000.0 * step + (clock_ahead_ms or {}).get(rank, 0.0)
            for kind, microbatch, start, end in times.operations[stage]:
                args = {"step": step, "micro_batch": microbatch, "stage": stage}
                category = "forward" if kind == "F" else "backward"
                events.append(
                    _event(rank, 0, f"{kind}{microbatch}", category, offset_ms + start * slow, end - start, args)
                )
                last = stage == plan.num_stages - 1
                if (kind == "F" and stage > 0) or (gradient_receives and kind in ("B", "I") and not last):
                    op = f"recv {'F' if kind == 'F' else 'B'}{microbatch}"
                    ops = [f"send {kind}{microbatch}", op] if sends_first else [op]
                    args = {"step": step, "ops": ops, "stages": [stage]}
                    if not sends_first:
                        args["op_stages"] = [stage]
                    name = " + ".join(ops)
                    events.append(_event(rank, 0, name, "communication", offset_ms + start * slow - 0.1, 0.1, args))
            done = offset_ms + times.makespan_ms * slow
            events.append(_event(rank, 1, "gradient average over replicas", "collective", done, 0.5, {"step": step}))
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    return path


def _event(pid: int, tid: int, name: str, category: str, start_ms: float, ms: float, args: dict[str, Any]) -> Any:
    return {"name": name, "cat": category, "ph": "X", "pid": pid, "tid": tid, "ts": start_ms * 1e3, "dur": ms * 1e3,
            "args": args}  # fmt: skip


def test_measured_step_is_the_last_recorded_one_from_time_zero(tmp_path: Path) -> None:
    result = _search("1f1b", 2)
    trace = _runtime_trace(result, tmp_path / "run.json")
    measured = read_measured_step(trace)
    assert measured.step == 3 and measured.steps == [1, 2, 3] and list(measured.rows) == list(range(6))
    for rank in range(6):  # time 0 is stage 0's first forward, on ranks 0 and 3
        stage = result.plan.stage_of_rank(rank).stage_index
        ours, expected = measured.operations(rank), result.times.operations[stage]
        assert [op[:2] for op in ours] == [op[:2] for op in expected]
        assert _times(ours) == pytest.approx(_times(expected))
        names = [e.name for e in measured.rows[rank]]
        assert names[-1] == "gradient average over replicas"
        assert ("recv F0" in names) == (stage > 0)
        assert all(e.end_ms >= e.start_ms >= 0 for e in measured.rows[rank])
    assert measured.duration_ms == pytest.approx(result.times.makespan_ms + 0.5)
    warm_up = read_measured_step(json.loads(trace.read_text()), step=1)  # the JSON object works too
    assert warm_up.step == 1 and warm_up.duration_ms > 1.5 * measured.duration_ms


def test_a_step_or_file_that_is_not_a_recorded_step_is_refused(tmp_path: Path) -> None:
    result = _search("1f1b", 1)
    trace = _runtime_trace(result, tmp_path / "run.json")
    with pytest.raises(PlanError, match=r"recorded steps 1-3, not step 7: pick one of them"):
        read_measured_step(trace, step=7)
    write_trace(result.plan, result.times, tmp_path / "predicted.json")
    with pytest.raises(PlanError, match=r"holds no training step: pass the file RaNNCStrategy\(trace=...\) wrote"):
        read_measured_step(tmp_path / "predicted.json")
    with pytest.raises(PlanError, match=r"'/no/such/trace.json' is not a Chrome trace \(FileNotFoundError"):
        read_measured_step("/no/such/trace.json")
    other = _search("1f1b", 2)  # 6 ranks
    with pytest.raises(PlanError, match=r"recorded on 3 rank\(s\) but the plan is for 6 device\(s\)"):
        write_comparison_chart(other.plan, other.times, trace, tmp_path / "chart.png")
    assert not (tmp_path / "chart.png").exists()


def test_comparison_chart_is_one_png_with_a_panel_each(tmp_path: Path) -> None:
    result = _search("1f1b", 2)
    trace = _runtime_trace(result, tmp_path / "run.json")
    both, predicted = tmp_path / "both.png", tmp_path / "predicted.png"
    measured = write_comparison_chart(result.plan, result.times, trace, both, step=2, title="Chain")
    write_chart(result.plan, result.times, predicted, title="Chain")
    assert measured.step == 2
    assert _png_size(both) == (1320, round((3.2 + 0.5 * (3 + 6)) * 110))
    assert both.stat().st_size > 1.3 * predicted.stat().st_size  # the second panel has as many boxes again


def test_show_draws_a_saved_plan_and_a_measured_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = _search("1f1b", 1)
    plan_path, chart = tmp_path / "plan.json", tmp_path / "step.png"
    result.plan.save(plan_path)
    trace = _runtime_trace(result, tmp_path / "run.json")
    assert main(["show", str(plan_path), "--chart", str(chart), "--measured", str(trace), "--step", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(format_plan(result.plan)) and f"above step 2 of {trace}" in printed
    assert _png_size(chart) == (1320, round((3.2 + 0.5 * (3 + 3)) * 110))
    assert main(["show", str(plan_path), "--chart", str(chart), "--trace", str(tmp_path / "again.json")]) == 0
    assert _png_size(chart) == (1320, round((1.6 + 0.5 * 3) * 110))  # the prediction alone
    events = json.loads((tmp_path / "again.json").read_text())["traceEvents"]
    assert sorted(e["ts"] + e["dur"] for e in events if e["ph"] == "X")[-1] == pytest.approx(
        result.plan.predicted_step_ms * 1e3, abs=1e-2
    )
    assert main(["show", str(plan_path), "--measured", str(trace), "--step", "2"]) == 2
    assert "pass --measured TRACE.json and --chart" in capsys.readouterr().err


# Predicted against measured, as medians (show --measured without --chart) --------------------------


@pytest.mark.parametrize(("schedule", "replicas", "zero_bubble"), [("1f1b", 2, False), ("1f1b", 1, True)])
def test_a_trace_that_ran_as_planned_measures_what_was_predicted(
    schedule: str, replicas: int, zero_bubble: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Medians over the steps after the first (twice as slow in this trace, as warm-up is) and
    over each stage's ranks and micro-batches; a zero-bubble backward is its two passes."""
    result = _search(schedule, replicas, zero_bubble=zero_bubble)
    assert result.plan.zero_bubble == zero_bubble
    trace = _runtime_trace(result, tmp_path / "run.json", steps=4)
    comparison = compare_with_trace(result.plan, trace)
    assert comparison.steps == [2, 3, 4] and len(comparison.stages) == 3
    for stage in comparison.stages:
        assert stage.measured_forward_ms == pytest.approx(stage.predicted_forward_ms)
        assert stage.measured_backward_ms == pytest.approx(stage.predicted_backward_ms)
    plan = result.plan
    whole = plan.stages[1].bwd_ms + plan.predicted_action_overhead_ms
    assert (comparison.stages[1].predicted_backward_ms > whole) == zero_bubble  # the split's own costs
    assert comparison.measured_step_ms == pytest.approx(result.times.makespan_ms + 0.5)
    assert comparison.replayed_step_ms == pytest.approx(comparison.measured_step_ms)
    assert comparison.measured_exchange_ms == pytest.approx(0.5)
    assert comparison.waiting_ms == pytest.approx(0.1 * 4)  # a receive before each of 4 forwards
    plan_path = tmp_path / "plan.json"
    plan.save(plan_path)
    assert main(["show", str(plan_path), "--measured", str(trace)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(format_plan(plan)) and f"medians of {trace}'s steps 2-4" in printed
    forward = comparison.stages[2].predicted_forward_ms
    assert f"    2  {forward:,.1f} -> {forward:,.1f} (1.00x)" in printed
    step = f"{comparison.measured_step_ms:,.1f}"
    assert f"measured collectives and optimizer): {step} -> {step} (1.00x)" in printed


@pytest.mark.parametrize("zero_bubble", [False, True])
def test_a_slow_stage_shows_in_its_own_row(zero_bubble: bool, tmp_path: Path) -> None:
    """An action the cost model got wrong misses in its stage's row, not in the others, and the
    step replayed with the measured actions meets the measured step: the miss is the action's,
    not the schedule model's."""
    result = _search("1f1b", 1, zero_bubble=zero_bubble)
    forwards, backwards, weights = plan_action_ms(result.plan)
    forwards[1] *= 1.5
    ran = simulate_plan(result.plan, (forwards, backwards, weights))  # how the slower stage ran
    trace = _runtime_trace(dataclasses.replace(result, times=ran), tmp_path / "run.json")
    comparison = compare_with_trace(result.plan, trace)
    ratios = [s.measured_forward_ms / s.predicted_forward_ms for s in comparison.stages]
    assert ratios == pytest.approx([1.0, 1.5, 1.0])
    assert [s.measured_backward_ms for s in comparison.stages] == pytest.approx(
        [s.predicted_backward_ms for s in comparison.stages]
    )
    assert comparison.measured_step_ms == pytest.approx(ran.makespan_ms + 0.5)
    assert comparison.measured_step_ms > result.times.makespan_ms + 0.5 + 1.0
    assert comparison.replayed_step_ms == pytest.approx(comparison.measured_step_ms)


@pytest.mark.parametrize("zero_bubble", [False, True])
def test_rank_clocks_set_apart_are_aligned_by_their_sends_and_receives(zero_bubble: bool, tmp_path: Path) -> None:
    """Ranks leave the barrier that starts their clocks milliseconds apart; a receive that
    seems to end before its data was made tells by how much."""
    result = _search("1f1b", 1, zero_bubble=zero_bubble)
    aligned = _runtime_trace(result, tmp_path / "aligned.json", steps=4, gradient_receives=True)
    skewed = _runtime_trace(
        result, tmp_path / "skewed.json", steps=4, gradient_receives=True, clock_ahead_ms={1: 5.0, 2: -3.0}
    )
    before, after = read_measured_step(aligned, step=3), read_measured_step(skewed, step=3)
    assert before.clock_offsets_ms == {} and after.clock_offsets_ms == pytest.approx({1: -5.0, 2: 3.0})
    for rank in range(3):
        assert _times(after.operations(rank)) == pytest.approx(_times(before.operations(rank)))
    truth, shifted = compare_with_trace(result.plan, aligned), compare_with_trace(result.plan, skewed)
    assert shifted.measured_step_ms == pytest.approx(truth.measured_step_ms)
    assert truth.replayed_step_ms == pytest.approx(truth.measured_step_ms)
    assert "ranks' clocks aligned by their sends and receives: rank 1 -5.0, rank 2 +3.0 ms" in comparison_text(shifted)
    assert "clocks aligned" not in comparison_text(truth)
    # a receive waited on behind a send counts too (the CI run of fcc81cd's successor saw a
    # gradient received 0.7 ms before it was made: those waits were skipped, so one bound was)
    fused = _runtime_trace(
        result, tmp_path / "fused.json", steps=4, gradient_receives=True, clock_ahead_ms={1: 5.0}, sends_first=True
    )
    assert read_measured_step(fused, step=3).clock_offsets_ms == pytest.approx({1: -5.0})
    # data-parallel replicas: which replica of a stage sent is unknown, so the clocks stay as they are
    replicas = _search("1f1b", 2)
    trace = _runtime_trace(replicas, tmp_path / "replicas.json", gradient_receives=True, clock_ahead_ms={1: 5.0})
    assert read_measured_step(trace).clock_offsets_ms == {}
    # unless the trace says which ranks share a clock (a host): here each stage's replicas have a
    # host of their own (ranks 0-2 are one pipeline, 3-5 the other), and every receive is bounded
    # by the earliest of the replicas that may have sent it
    hosts = {0: 0, 3: 0, 1: 1, 4: 1, 2: 2, 5: 2}
    ahead = {1: 5.0, 4: 5.0, 2: -3.0, 5: -3.0}
    trace = _runtime_trace(
        replicas, tmp_path / "hosts.json", gradient_receives=True, clock_ahead_ms=ahead, clocks=hosts
    )
    assert read_measured_step(trace).clock_offsets_ms == pytest.approx({1: -5.0, 4: -5.0, 2: 3.0, 5: 3.0})
    # ranks on one clock are never moved apart, even where their messages would say so
    one = _runtime_trace(
        result, tmp_path / "one.json", gradient_receives=True, clock_ahead_ms={1: 5.0}, clocks={r: 0 for r in range(3)}
    )
    assert read_measured_step(one, step=2).clock_offsets_ms == {}


def test_a_trace_of_another_run_or_no_trace_is_refused_by_the_comparison(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = _runtime_trace(_search("1f1b", 1), tmp_path / "run.json")  # 3 ranks
    other = _search("1f1b", 2)  # 6 ranks
    with pytest.raises(PlanError, match=r"recorded on 3 rank\(s\) but the plan is for 6 device\(s\)"):
        compare_with_trace(other.plan, trace)
    with pytest.raises(PlanError, match=r"'/no/such/trace.json' is not a Chrome trace \(FileNotFoundError"):
        compare_with_trace(other.plan, "/no/such/trace.json")
    other.plan.save(tmp_path / "plan.json")
    assert main(["show", str(tmp_path / "plan.json"), "--measured", str(trace)]) == 2
    assert "recorded on 3 rank(s)" in capsys.readouterr().err
