"""One rank of a run started by another launcher than Lightning's: ``torchrun ... external_rank.py
OUT_DIR NUM_NODES LABEL``, or SLURM's ``srun`` (simulated by the tests with its variables).
Lightning finds the torchelastic or SLURM environment and launches nothing itself."""

import sys
from pathlib import Path

import lightning_rannc

from helpers.cases import run_case


def main() -> None:
    out_dir, num_nodes, label = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    strategy = lightning_rannc.RaNNCStrategy(pipeline_stages=2, timeout=120, fault_timeout=30)
    trainer = run_case("gpt", out_dir, label=label, strategy=strategy, devices=1, num_nodes=num_nodes)
    print(f"cluster environment: {type(trainer.strategy.cluster_environment).__name__}")


if __name__ == "__main__":
    main()
