"""``python -m lightning_rannc plan|show``: plan a model for a cluster you may not have.

    python -m lightning_rannc plan benchmarks/models.py:GPTLM --devices 64 --nodes 8 --device h100 \\
        --device-memory 80GB --batch-size 512 --init-args '{"layers": 48}' --output plan.json
    python -m lightning_rannc plan benchmarks/models.py:GPTLM --devices 8 --chart step.png --trace step.json
    python -m lightning_rannc show plan.json
    python -m lightning_rannc show plan.json --measured trace.json    # predicted vs measured, per stage
    python -m lightning_rannc show plan.json --chart step.png --measured trace.json
    python -m lightning_rannc consolidate checkpoints/last.ckpt last_full.ckpt
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_rannc.config import RaNNCConfig
from lightning_rannc.dry_run import PRECISIONS
from lightning_rannc.errors import PlanError, RaNNCError
from lightning_rannc.plan.devices import DEVICES, get_device, parse_bytes
from lightning_rannc.plan.plan import SCHEDULES, ZERO_STAGES, PartitionPlan
from lightning_rannc.plan.report import format_plan, microbatch_choice, print_rich_plan
from lightning_rannc.plan.search import SearchSettings
from lightning_rannc.plan.simulate import ScheduleTimes, simulate_plan
from lightning_rannc.report.chart import require_matplotlib, write_chart, write_comparison_chart
from lightning_rannc.report.chrome_trace import write_trace
from lightning_rannc.report.compare import compare_with_trace, comparison_text

_ON_OFF = {"auto": None, "on": True, "off": False}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RaNNCConfig)}
"""The strategy's option defaults: the dry run plans as a run with the same options would."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (RaNNCError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lightning_rannc", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(required=True, metavar="{plan,show,consolidate}")
    plan = commands.add_parser("plan", help="plan a LightningModule built on the meta device (dry run)")
    plan.add_argument("target", help="MODULE_OR_FILE:ClassName of a LightningModule with a train_dataloader()")
    plan.add_argument("--init-args", default="{}", help="JSON object of keyword arguments for the class")
    plan.add_argument("--devices", type=int, required=True, help="devices in all (N)")
    plan.add_argument("--nodes", type=int, default=1, help="nodes the devices are spread over")
    plan.add_argument("--device", default="h100", choices=sorted(DEVICES), help="device preset for analytic costs")
    plan.add_argument("--device-memory", default=None, help="memory per device, e.g. 80GB (default: the preset's)")
    plan.add_argument(
        "--memory-margin", type=float, default=_DEFAULTS["memory_margin"], help="share of memory kept free"
    )
    plan.add_argument("--batch-size", type=int, default=None, help="global batch (default: the sample batch's)")
    plan.add_argument("--optimizer", default=None, help="adamw, sgd, sgd_momentum, ... (default: from the module)")
    plan.add_argument(
        "--precision", default="32-true", choices=list(PRECISIONS), help="the Trainer's precision (default: 32-true)"
    )
    plan.add_argument("--stages", type=int, default=None, help="force the pipeline stage count")
    plan.add_argument("--replicas", type=int, default=None, help="force the data-parallel degree")
    plan.add_argument("--micro-batches", type=int, default=None, help="force the micro-batch count")
    plan.add_argument("--max-micro-batches", type=int, default=_DEFAULTS["max_micro_batches"])
    plan.add_argument("--min-micro-batch-size", type=int, default=_DEFAULTS["min_micro_batch_size"])
    plan.add_argument("--schedule", default=_DEFAULTS["schedule"], choices=["auto", *SCHEDULES])
    plan.add_argument("--virtual-stages", type=int, default=None, help="stages per rank (interleaved 1F1B)")
    plan.add_argument(
        "--zero-bubble",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run 1F1B as zero bubble (split backward), or never (default: where predicted faster)",
    )
    plan.add_argument("--activation-checkpointing", default="auto", choices=sorted(_ON_OFF))
    plan.add_argument(
        "--offload-optimizer", default="auto", choices=sorted(_ON_OFF), help="optimizer state in host memory"
    )
    plan.add_argument(
        "--zero-stage", default="auto", choices=["auto", *map(str, ZERO_STAGES)], help="optimizer state over replicas"
    )
    plan.add_argument(
        "--max-blocks", type=int, default=_DEFAULTS["max_blocks"], help="blocks the graph is coarsened into"
    )
    plan.add_argument("--output", default=None, help="write the plan as JSON here")
    _add_output_options(plan)
    plan.set_defaults(run=_plan)
    show = commands.add_parser("show", help="print a saved plan as a table (and draw it)")
    show.add_argument("plan", help="a plan.json written by `plan` or by RaNNCStrategy(deployment=...)")
    _add_output_options(show)
    show.add_argument(
        "--measured",
        default=None,
        metavar="TRACE.json",
        help="a runtime trace of the plan (RaNNCStrategy(trace=...)): print each stage's predicted and measured "
        "forward and backward (medians), and with --chart draw a step of it below the prediction",
    )
    show.add_argument("--step", type=int, default=None, help="the step of --measured to draw (default: the last)")
    show.set_defaults(run=_show)
    merge = commands.add_parser("consolidate", help="turn a sharded checkpoint directory into one checkpoint file")
    merge.add_argument("checkpoint", help="a directory written with RaNNCStrategy(state_dict_type='sharded')")
    merge.add_argument("output", help="the checkpoint file to write (plain Lightning loads it)")
    merge.set_defaults(run=_consolidate)
    return parser


def _add_output_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--chart", default=None, metavar="PATH.png", help="draw the simulated step (matplotlib)")
    command.add_argument("--trace", default=None, metavar="PATH.json", help="the simulated step as a Chrome trace")
    command.add_argument(
        "--rich", action="store_true", help="draw the table with rich (the default in a terminal, if installed)"
    )


def _plan(args: argparse.Namespace) -> int:
    from lightning_rannc.dry_run import optimizer_kind, plan_module, sample_batch

    started = time.perf_counter()
    _check_outputs(args)
    module = _build(args.target, json.loads(args.init_args))
    batch = sample_batch(module)
    device = get_device(args.device)
    settings = SearchSettings(
        num_devices=args.devices,
        global_batch_size=args.batch_size or _leading_size(batch),
        device=device,
        devices_per_node=max(1, args.devices // args.nodes),
        memory_limit=parse_bytes(args.device_memory) if args.device_memory else None,
        memory_margin=args.memory_margin,
        optimizer=args.optimizer or optimizer_kind(module),
        pipeline_stages=args.stages,
        replicas=args.replicas,
        micro_batches=args.micro_batches,
        max_micro_batches=args.max_micro_batches,
        min_micro_batch_size=args.min_micro_batch_size,
        schedule=args.schedule,
        virtual_stages=args.virtual_stages,
        activation_checkpointing=_ON_OFF[args.activation_checkpointing],
        zero_stage=None if args.zero_stage == "auto" else int(args.zero_stage),
        zero_bubble=args.zero_bubble,
        offload_optimizer=_ON_OFF[args.offload_optimizer],
    )
    result = plan_module(module, batch, settings, max_blocks=args.max_blocks, precision=args.precision)
    _print_plan(result.plan, args.rich)
    choice = microbatch_choice(result.plan, result.candidates)
    if choice is not None:
        print(choice)
    print(f"planned in {time.perf_counter() - started:.1f} s ({len(result.candidates)} layouts compared)")
    if args.output:
        result.plan.save(args.output)
        print(f"wrote {args.output}")
    _write_pictures(args, result.plan, result.times, title=args.target.rpartition(":")[2])
    return 0


def _check_outputs(args: argparse.Namespace) -> None:
    """Fail before planning (which may take minutes) if an output cannot be written."""
    paths = [p for p in (getattr(args, "output", None), args.chart, args.trace) if p]
    for path in paths:
        if not Path(path).resolve().parent.is_dir():
            raise PlanError(f"Cannot write {path}: its folder does not exist.")
    if getattr(args, "step", None) is not None and not (args.measured and args.chart):
        raise PlanError("--step picks the step of the runtime trace to draw: pass --measured TRACE.json and --chart.")
    if args.chart:
        require_matplotlib()


def _print_plan(plan: PartitionPlan, rich: bool) -> None:
    """The table with rich when asked or in a terminal, else (or without rich) as plain text."""
    if (rich or sys.stdout.isatty()) and print_rich_plan(plan):
        return
    if rich:
        print("rich is not installed (pip install rich): printing the plain table.", file=sys.stderr)
    print(format_plan(plan))


def _write_pictures(args: argparse.Namespace, plan: PartitionPlan, times: ScheduleTimes, title: str | None) -> None:
    measured = getattr(args, "measured", None)
    if args.chart and measured:
        shown = write_comparison_chart(plan, times, measured, args.chart, step=args.step, title=title)
        print(f"wrote {args.chart} (predicted step above step {shown.step} of {measured})")
    elif args.chart:
        write_chart(plan, times, args.chart, title=title)
        print(f"wrote {args.chart}")
    if args.trace:
        write_trace(plan, times, args.trace)
        print(f"wrote {args.trace}")


def _consolidate(args: argparse.Namespace) -> int:
    from lightning_rannc.runtime.checkpoint import consolidate

    consolidate(args.checkpoint, args.output)
    print(f"wrote {args.output}")
    return 0


def _show(args: argparse.Namespace) -> int:
    _check_outputs(args)
    plan = PartitionPlan.load(args.plan)
    _print_plan(plan, args.rich)
    if args.measured:
        print(comparison_text(compare_with_trace(plan, args.measured), args.measured))
    _write_pictures(args, plan, simulate_plan(plan), title=None)
    return 0


def _build(target: str, init_args: dict[str, Any]) -> torch.nn.Module:
    """Import ``MODULE_OR_FILE:ClassName`` and instantiate it on the meta device."""
    source, _, name = target.rpartition(":")
    if not source or not name:
        raise PlanError(
            f"{target!r} is not MODULE_OR_FILE:ClassName (e.g. benchmarks/models.py:GPTLM or my_pkg.models:Net)."
        )
    module = _import(source)
    cls = getattr(module, name, None)
    if cls is None:
        raise PlanError(f"{source} has no {name!r}.")
    with torch.device("meta"):
        return cls(**init_args)


def _import(source: str) -> Any:
    if source.endswith(".py") or "/" in source:
        path = Path(source)
        if not path.is_file():
            raise PlanError(f"No such file: {source}.")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(source)


def _leading_size(batch: Any) -> int:
    from lightning_rannc._compat import tree_flatten

    leaves = [leaf for leaf in tree_flatten(batch)[0] if isinstance(leaf, torch.Tensor) and leaf.dim()]
    if not leaves:
        raise PlanError("The sample batch holds no tensor with a batch dimension; pass --batch-size.")
    return int(leaves[0].shape[0])


if __name__ == "__main__":
    raise SystemExit(main())
