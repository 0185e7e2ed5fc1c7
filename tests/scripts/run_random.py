"""One random DAG model trained pipelined: ``python run_random.py OUT.json DEVICES MICRO_BATCHES SPEC
[ZERO_BUBBLE]`` (``1``: backwards split into input and weight passes; default the planner's choice).
Rank 0 writes the losses and final weights; ``verify=True`` also compares the first step with
the unpartitioned one on every rank (and raises on a difference)."""

import json
import sys
from pathlib import Path

from lightning_rannc import RaNNCStrategy

from helpers.random_models import train


def main() -> None:
    out, devices, microbatches, spec = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    zero_bubble = {"1": True, "0": False}.get(sys.argv[5] if len(sys.argv) > 5 else "", "auto")
    strategy = RaNNCStrategy(
        pipeline_stages=devices,
        micro_batches=microbatches,
        zero_bubble=zero_bubble,
        verify=True,
        verify_tolerance=1e-5,
        timeout=120,
    )
    # One pipeline over all devices (D = 1): every rank reads the whole batch, in order.
    trainer, losses, weights = train(spec, steps=3, strategy=strategy, devices=devices, use_distributed_sampler=False)
    if trainer.is_global_zero:
        out.write_text(json.dumps({"losses": losses, "weights": weights, "plan": trainer.strategy.plan.to_json()}))


if __name__ == "__main__":
    main()
