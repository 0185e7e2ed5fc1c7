"""One rank of a run started by ``torchrun`` (not Lightning's launcher): ``torchrun ... torchrun_case.py
OUT_DIR NUM_NODES``. Lightning finds the torchelastic environment and launches nothing itself."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning_rannc  # noqa: E402

from cases import run_case  # noqa: E402


def main() -> None:
    out_dir, num_nodes = Path(sys.argv[1]), int(sys.argv[2])
    strategy = lightning_rannc.RaNNCStrategy(pipeline_stages=2, timeout=120, fault_timeout=30)
    run_case("gpt", out_dir, label="torchrun", strategy=strategy, devices=1, num_nodes=num_nodes)


if __name__ == "__main__":
    main()
