"""The examples as a Hydra app: model, data loader, strategy and Trainer are each built from
their ``_target_`` in ``configs/hydra/<name>.yaml`` (gpt, bert, resnet); override any value on
the command line::

    python examples/hydra_app.py
    python examples/hydra_app.py strategy.pipeline_stages=1 trainer.max_steps=5
    python examples/hydra_app.py --config-name bert

Needs hydra-core (``pip install -e ".[hydra]"``). Lightning's launcher starts the other ranks with
the same overrides, in the same Hydra run directory.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

import lightning_rannc  # noqa: F401  (registers strategy="rannc", for configs that name it)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `gpt.GPT`, `bert.MaskedLM` in the _target_s


@hydra.main(config_path="../configs/hydra", config_name="gpt", version_base=None)
def main(config: DictConfig) -> None:
    L.seed_everything(0)
    model = instantiate(config.model)
    trainer = instantiate(config.trainer, strategy=instantiate(config.strategy))
    loader = instantiate(config.data)
    start = time.perf_counter()
    trainer.fit(model, loader)
    elapsed = time.perf_counter() - start
    if trainer.is_global_zero:
        steps, plan = trainer.global_step, trainer.strategy.plan.summary()[0]
        print(f"final train_loss {float(trainer.callback_metrics['train_loss']):.4f} after {steps} steps")
        print(f"throughput {steps * loader.batch_size / elapsed:.1f} samples/s; {plan}")


if __name__ == "__main__":
    main()
