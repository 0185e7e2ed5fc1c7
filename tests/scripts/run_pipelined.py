"""Run test cases with ``Trainer(strategy=RaNNCStrategy(...), devices=N)``.

Started by the tests as a plain script, so Lightning's own launcher starts the other ranks,
exactly as for a user. Usage: ``python run_pipelined.py OUT_DIR DEVICES CASE[,CASE...]``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning_rannc  # noqa: E402

from cases import run_case  # noqa: E402


def main() -> None:
    out_dir, devices, names = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
    for name in names:
        # The ranks must read the reference's batch order; Lightning's injected sampler would shuffle.
        strategy = lightning_rannc.RaNNCStrategy(micro_batches=4, timeout=120)
        run_case(name, out_dir, strategy=strategy, devices=devices, use_distributed_sampler=False)


if __name__ == "__main__":
    main()
