"""Run evaluation cases with ``Trainer(strategy=RaNNCStrategy(...), devices=N)``.

Usage: ``python evaluate.py OUT_DIR DEVICES RUNS_JSON`` where RUNS_JSON is a list of
``{"label": ..., "case": ..., "strategy": {RaNNCStrategy arguments}}``, optionally with
``"weights": LABEL`` (no fit: evaluate that earlier run's final weights with a fresh Trainer).
"""

import json
import sys
from pathlib import Path

import lightning_rannc

from helpers.eval_cases import run_evaluation


def main() -> None:
    out_dir, devices, runs = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    for run in runs:
        strategy = lightning_rannc.RaNNCStrategy(timeout=120, **run["strategy"])
        weights = out_dir / f"{run['weights']}_weights.pt" if "weights" in run else None
        run_evaluation(run["case"], out_dir, run["label"], weights=weights, strategy=strategy, devices=devices)


if __name__ == "__main__":
    main()
