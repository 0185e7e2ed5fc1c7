"""Run ``eval_cases.run_with_callbacks`` with ``RaNNCStrategy(pipeline_stages=2)`` on 2 processes.

Usage: ``python callbacks.py OUT_DIR``.
"""

import sys
from pathlib import Path

import lightning_rannc

from helpers.eval_cases import run_with_callbacks

if __name__ == "__main__":
    strategy = lightning_rannc.RaNNCStrategy(pipeline_stages=2, timeout=120)
    run_with_callbacks(Path(sys.argv[1]), "rannc", strategy=strategy, devices=2)
