"""Run test cases with ``Trainer(strategy=RaNNCStrategy(...), devices=N)``.

Started by the tests as a plain script, so Lightning's own launcher starts the other ranks,
exactly as for a user. Usage: ``python run_pipelined.py OUT_DIR DEVICES RUNS_JSON`` where
RUNS_JSON is a list of ``{"label": ..., "case": ..., "strategy": {RaNNCStrategy arguments}}``,
optionally with ``"trainer": {Trainer arguments}`` and ``"resume": LABEL_OR_PATH`` (a checkpoint
to resume from: an earlier run's label in OUT_DIR, or a path). A ``trace`` file name without a
folder is written in OUT_DIR.
"""

import json
import sys
from pathlib import Path

import lightning_rannc

from helpers.cases import run_case


def main() -> None:
    out_dir, devices, runs = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    for run in runs:
        options = dict(run.get("strategy", {}))
        trace = options.get("trace")
        if isinstance(trace, str) and "/" not in trace:
            options["trace"] = str(out_dir / trace)
        strategy = lightning_rannc.RaNNCStrategy(timeout=120, **options)
        resume = run.get("resume")
        ckpt_path = None if resume is None else (Path(resume) if "/" in resume else out_dir / f"{resume}.ckpt")
        trainer = {"strategy": strategy, "devices": devices, **run.get("trainer", {})}
        run_case(run["case"], out_dir, label=run["label"], ckpt_path=ckpt_path, **trainer)


if __name__ == "__main__":
    main()
