"""Chrome trace and PNG chart of a planned step (``lightning_rannc.plan.chart``, ``plan --chart/--trace``)."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from lightning_rannc.__main__ import main
from lightning_rannc.errors import PlanError
from lightning_rannc.plan.chart import write_chart, write_trace
from lightning_rannc.plan.cost_model import BlockCost
from lightning_rannc.plan.devices import DeviceSpec
from lightning_rannc.plan.search import SearchResult, SearchSettings, TensorTable, search_plan
from lightning_rannc.plan.simulate import ScheduleTimes

ROOT = Path(__file__).resolve().parents[2]
TARGET = f"{ROOT / 'benchmarks' / 'models.py'}:GPTLM"
SMALL = json.dumps({"layers": 4, "hidden": 256, "heads": 4, "seq_len": 128, "vocab": 1000, "batch_size": 4})
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MATPLOTLIB_MODULES = ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg")

DEVICE = DeviceSpec(
    name="test",
    flops_per_s={"float32": 1e12},
    memory_bandwidth=1e12,
    memory_bytes=10**10,
    intra_node_bandwidth=1e9,
    inter_node_bandwidth=1e8,
    op_overhead_ms=0.0,
)


def _search(schedule: str, replicas: int, stages: int = 3, microbatches: int = 4) -> SearchResult:
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
        device=DEVICE,
        pipeline_stages=stages,
        replicas=replicas,
        micro_batches=microbatches,
        schedule=schedule,
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
    args += ["--micro-batches", "4", "--schedule", "1f1b"]
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
