"""The runtime trace of a real 2-process run: its sends and receives, and the chart that puts a
step of it below the plan's prediction (``show plan.json --chart --measured trace.json``)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from lightning_rannc import PartitionPlan
from lightning_rannc.__main__ import main
from lightning_rannc.report.measured import read_measured_step

from helpers.dist import run_script

pytestmark = pytest.mark.distributed

MICRO_BATCHES, TRACE_STEPS = 4, 3


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-stage 1F1B training on 2 gloo processes, writing its deployment plan and trace."""
    out = tmp_path_factory.mktemp("traced")
    strategy = {
        "pipeline_stages": 2,
        "micro_batches": MICRO_BATCHES,
        "schedule": "1f1b",
        "zero_bubble": False,
        "trace": str(out / "trace.json"),
        "trace_steps": TRACE_STEPS,
        "deployment": str(out / "plan.json"),
    }
    run_script(
        "run_pipelined.py", str(out), "2", json.dumps([{"label": "traced", "case": "gpt", "strategy": strategy}])
    )
    return out


def _timed(run: Path) -> list[dict[str, Any]]:
    return [e for e in json.loads((run / "trace.json").read_text())["traceEvents"] if e["ph"] == "X"]


def test_every_send_and_receive_of_the_schedule_is_timed(run: Path) -> None:
    timed = _timed(run)
    transfers = [e for e in timed if e["cat"] == "communication"]
    assert transfers and all(e["tid"] == 0 and e["dur"] >= 0 for e in transfers)
    expected = {0: ("send F", "recv B"), 1: ("recv F", "send B")}  # stage 0 sends activations, gets gradients
    for rank, kinds in expected.items():
        for step in range(1, TRACE_STEPS + 1):
            mine = [e for e in transfers if e["pid"] == rank and e["args"]["step"] == step]
            ops = sorted(op for e in mine for op in e["args"]["ops"])
            assert ops == sorted(f"{kind}{m}" for kind in kinds for m in range(MICRO_BATCHES))
            assert all(e["args"]["stages"] == [rank] and e["name"] == " + ".join(e["args"]["ops"]) for e in mine)
            assert all(e["args"]["op_stages"] == [rank] * len(e["args"]["ops"]) for e in mine)
    assert {e["args"]["step"] for e in transfers} == set(range(1, TRACE_STEPS + 1))  # no more steps than asked
    for rank in (0, 1):  # one thread runs compute and waits in turn
        row = sorted((e["ts"], e["ts"] + e["dur"]) for e in timed if e["pid"] == rank and e["tid"] == 0)
        assert all(a[1] <= b[0] + 0.5 for a, b in zip(row, row[1:]))
    on_rank1 = {e["name"]: e for e in timed if e["pid"] == 1 and e["args"]["step"] == TRACE_STEPS}
    for m in range(MICRO_BATCHES):  # a forward starts after its input arrived
        receive = next(e for name, e in on_rank1.items() if f"recv F{m}" in name.split(" + "))
        assert receive["ts"] + receive["dur"] <= on_rank1[f"F{m}"]["ts"] + 0.5


def test_measured_step_of_the_real_trace(run: Path) -> None:
    measured = read_measured_step(run / "trace.json")
    assert measured.step == TRACE_STEPS and measured.steps == list(range(1, TRACE_STEPS + 1))
    assert sorted(measured.rows) == [0, 1]
    for rank, events in measured.rows.items():
        operations = measured.operations(rank)
        assert sorted((kind, m) for kind, m, _, _ in operations) == [(k, m) for k in "BF" for m in range(MICRO_BATCHES)]
        assert all(0 <= e.start_ms <= e.end_ms <= measured.duration_ms for e in events)
        assert {e.category for e in events} >= {"forward", "backward", "communication", "collective"}
    assert min(e.start_ms for events in measured.rows.values() for e in events) == 0.0
    assert read_measured_step(run / "trace.json", step=1).step == 1
    # the ranks' clocks aligned: every receive ends after the action that made its data
    for step in measured.steps:
        rows = read_measured_step(run / "trace.json", step=step).rows
        ended = {(rank, e.name): e.end_ms for rank, events in rows.items() for e in events}
        for rank, events in rows.items():
            for e in events:
                for op in e.args.get("ops", []):
                    if op.startswith("recv "):
                        made = ended[(1 - rank, op.removeprefix("recv "))]
                        assert e.end_ms >= made - 1e-6, (step, rank, op, e.end_ms, made)


def test_show_draws_the_deployment_above_the_measured_step(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = PartitionPlan.load(run / "plan.json")
    assert plan.world_size == 2 and plan.num_microbatches == MICRO_BATCHES and plan.predicted_step_ms > 0
    chart = run / "compared.png"
    assert main(["show", str(run / "plan.json"), "--chart", str(chart), "--measured", str(run / "trace.json")]) == 0
    assert f"above step {TRACE_STEPS} of {run / 'trace.json'}" in capsys.readouterr().out
    data = chart.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (1320, round((3.2 + 0.5 * (2 + 2)) * 110))
    assert 20_000 < len(data) < 2_000_000
