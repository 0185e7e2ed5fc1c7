"""Run ``eval_cases.run_with_callbacks`` with ``RaNNCStrategy(pipeline_stages=2)`` on 2 processes.

Usage: ``python callbacks.py OUT_DIR``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning_rannc  # noqa: E402

from eval_cases import run_with_callbacks  # noqa: E402

if __name__ == "__main__":
    strategy = lightning_rannc.RaNNCStrategy(pipeline_stages=2, timeout=120)
    run_with_callbacks(Path(sys.argv[1]), "rannc", strategy=strategy, devices=2)
