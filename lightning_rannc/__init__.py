"""lightning_rannc: automatic pipeline partitioning for PyTorch Lightning.

Importing the package registers ``"rannc"`` in Lightning's strategy registry (and in
``pytorch_lightning``'s when that package is installed), so ``Trainer(strategy="rannc")`` works.

Only the public API is imported here. The layers below import downwards only (checked by
``tests/unit/test_structure.py``): ``strategy`` -> ``integration`` -> ``runtime`` -> ``profile``,
``plan``, ``capture``; ``plan`` imports no torch. README's "Architecture" maps each folder.
"""

from __future__ import annotations

import importlib.util

from lightning.pytorch.strategies import StrategyRegistry

from lightning_rannc.config import RaNNCConfig
from lightning_rannc.errors import CaptureError, PlanError, RaNNCError, RuntimeSetupError
from lightning_rannc.plan.plan import PartitionPlan, Plan, StagePlan
from lightning_rannc.runtime.weights import load_pretrained
from lightning_rannc.strategy import RaNNCStrategy

__all__ = [
    "RaNNCStrategy",
    "RaNNCConfig",
    "load_pretrained",
    "PartitionPlan",
    "Plan",
    "StagePlan",
    "RaNNCError",
    "CaptureError",
    "PlanError",
    "RuntimeSetupError",
]
__version__ = "0.1.0"

RaNNCStrategy.register_strategies(StrategyRegistry)

if importlib.util.find_spec("pytorch_lightning") is not None:
    import lightning_rannc._pl_compat  # noqa: F401  (registers the pytorch_lightning class)
