"""The plan table: plain text (logs, pipes) and rich (``show``/``plan`` in a terminal or with ``--rich``)."""

from __future__ import annotations

import dataclasses
import io
import re
import sys
from pathlib import Path

import pytest

from lightning_rannc.__main__ import main
from lightning_rannc.plan.plan import PartitionPlan, StagePlan
from lightning_rannc.plan.report import format_plan, print_rich_plan

RICH_MODULES = ("rich", "rich.console", "rich.table", "rich.text")


def _plan() -> PartitionPlan:
    """Two stages with memory, one checkpointed, and a module span that looks like rich markup."""
    spans = ["emb, [bold]blocks.0-1", "blocks.2-3, head, <top>"]
    memory = {"params": 3 * 2**20, "grads": 3 * 2**20, "optimizer": 6 * 2**20, "activations": 2**20, "buffers": 0}
    stages = [
        StagePlan(
            stage_index=s,
            ranks=[s, s + 2],
            node_start=10 * s,
            node_end=10 * s + 10,
            module_span=spans[s],
            tensor_names=[f"w{s}"],
            num_params=1_234_567 * (s + 1),
            fwd_ms=1.5 + s,
            bwd_ms=3.25 + s,
            param_bytes=2**20,
            activation_bytes=2**20,
            send_bytes=2**10,
            checkpoint=s == 1,
            memory={**memory, "total": 13 * 2**20 * (s + 1)},
        )
        for s in range(2)
    ]
    return PartitionPlan(
        graph_fingerprint="test",
        world_size=4,
        num_microbatches=4,
        microbatch_size=2,
        stages=stages,
        schedule="1f1b",
        num_replicas=2,
        predicted_step_ms=42.0,
        predicted_bubble=0.2,
    )


def _plain_rows(text: str) -> list[list[str]]:
    """The table of ``format_plan``: the lines between the rule under the header and the footer."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if set(line) == {"-"})
    table = [lines[rule - 1], *lines[rule + 1 : rule + 3]]
    return [re.split(r"\s{2,}", line.strip()) for line in table]


def test_rich_table_has_the_plain_tables_columns_and_rows() -> None:
    pytest.importorskip("rich")
    from lightning_rannc.plan.report import rich_plan_table

    plan = _plan()
    plain = _plain_rows(format_plan(plan))
    assert plain[0][-1] == "total MiB" and plain[1][2] == "emb, [bold]blocks.0-1" and len(plain[0]) == 13
    table = rich_plan_table(plan)
    assert [column.header for column in table.columns] == plain[0]
    cells = [[str(cell) for cell in column.cells] for column in table.columns]
    assert [list(row) for row in zip(*cells)] == plain[1:]
    assert [column.justify for column in table.columns].count("left") == 1 and table.columns[2].justify == "left"


def test_rich_output_holds_every_line_of_the_plain_one() -> None:
    pytest.importorskip("rich")
    plan = _plan()
    out = io.StringIO()
    assert print_rich_plan(plan, file=out)
    printed = out.getvalue()
    assert "│" in printed  # drawn by rich, not the plain table
    plain = format_plan(plan).splitlines()
    assert printed.splitlines()[0] == plain[0] and printed.splitlines()[-2:] == plain[-2:]
    body = [line for line in printed.splitlines() if "│" in line]
    rows = [[cell.strip() for cell in line.strip("│ ").split("│")] for line in body]
    assert rows == _plain_rows(format_plan(plan))[1:]  # one line per stage: nothing wrapped, markup kept as text


def test_show_prints_the_plain_table_when_rich_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in RICH_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    plan = _plan()
    plan.save(tmp_path / "plan.json")
    assert print_rich_plan(plan) is False
    assert capsys.readouterr().out == ""
    assert main(["show", str(tmp_path / "plan.json"), "--rich"]) == 0
    captured = capsys.readouterr()
    assert captured.out == format_plan(plan) + "\n"
    assert "rich is not installed (pip install rich)" in captured.err


def test_show_uses_rich_only_when_asked_or_in_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("rich")
    plan = _plan()
    plan.save(tmp_path / "plan.json")
    assert main(["show", str(tmp_path / "plan.json")]) == 0
    assert capsys.readouterr().out == format_plan(plan) + "\n"  # captured: not a terminal
    assert main(["show", str(tmp_path / "plan.json"), "--rich"]) == 0
    captured = capsys.readouterr()
    assert "│" in captured.out and captured.err == ""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["show", str(tmp_path / "plan.json")]) == 0
    assert "│" in capsys.readouterr().out


def test_plan_lines_for_the_log_are_rich_only_when_asked_and_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_rannc.plan.report import plan_lines

    plan = _plan()
    plan.zero_bubble = True
    plain = plan_lines(plan, rich=False)
    assert plain == format_plan(plan).splitlines() and "schedule 1f1b (zero bubble)" in plain[0]
    drawn = plan_lines(plan, rich=True)
    assert drawn[0] == plain[0] and drawn[-2:] == plain[-2:]  # the same headline and footer
    assert any("┃ stage" in line for line in drawn) and not any("┃" in line for line in plain)
    for module in RICH_MODULES:
        monkeypatch.setitem(sys.modules, module, None)  # as if rich were not installed
    assert plan_lines(plan, rich=True) == plain


def _memory(num_microbatches: int, optimizer_factor: float = 2.0, activation_bytes: int = 8 * 2**20):
    from lightning_rannc.plan.memory import stage_memory

    return stage_memory(
        param_bytes=4 * 2**20,
        trainable_bytes=4 * 2**20,
        activation_bytes=activation_bytes,
        input_bytes=0,
        output_bytes=0,
        in_flight=num_microbatches,
        num_microbatches=num_microbatches,
        checkpoint=False,
        optimizer_factor=optimizer_factor,
    )


def test_the_grads_column_shows_the_gradients_and_the_total_counts_shared_bytes_once() -> None:
    one = _memory(1, optimizer_factor=0.0)  # SGD: backward is the peak, gradients reuse activations
    assert one.grads == 4 * 2**20 and one.shared == 4 * 2**20
    assert one.total == one.params + one.activations  # activations, then gradients in their place
    four = _memory(4, optimizer_factor=0.0)  # finished micro-batches' gradients beside the others'
    assert four.grads == 4 * 2**20 and four.shared == 0
    assert four.total == four.params + four.activations + four.grads
    stepping = _memory(1, activation_bytes=2**20)  # Adam's step after backward is the peak
    assert stepping.grads == 8 * 2**20 and stepping.shared == stepping.activations  # gone by then
    assert stepping.total == stepping.params + stepping.grads + stepping.optimizer


def test_the_plan_table_says_what_grads_and_activations_share() -> None:
    plan = _plan()
    plan.stages[0].memory = {**plan.stages[0].memory, "shared": 2**20}
    text = format_plan(plan)
    assert "total counts once what grads and activ share (up to 1.00 MiB a stage)" in text
    assert "share" not in format_plan(_plan())  # nothing shared, no line


def test_a_plan_with_a_large_bubble_says_why_more_micro_batches_were_not_chosen() -> None:
    from lightning_rannc.plan.report import microbatch_choice
    from lightning_rannc.plan.search import Candidate

    plan = dataclasses.replace(_plan(), num_microbatches=1, microbatch_size=8, predicted_bubble=0.48)
    candidates = [
        Candidate(2, 2, 1, "gpipe", 6.6),
        Candidate(2, 2, 2, "gpipe", 8.3),
        Candidate(2, 2, 4, "gpipe", None),  # did not fit
        Candidate(4, 1, 8, "1f1b", 5.0),  # another layout: not a micro-batch alternative
    ]
    line = microbatch_choice(plan, candidates)
    assert line is not None
    assert line.startswith("1 micro-batch(es) predicted fastest; other counts compared: 2 -> 8.3 ms")
    assert "4 ->" not in line and "8 ->" not in line and "does not shrink with its size" in line
    assert microbatch_choice(plan, candidates[:1]) is None  # nothing else compared (a forced count)
    small_bubble = dataclasses.replace(plan, predicted_bubble=0.1)
    assert "does not shrink" not in (microbatch_choice(small_bubble, candidates) or "")
