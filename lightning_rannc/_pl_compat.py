"""``RaNNCStrategy`` for the standalone ``pytorch_lightning`` package.

``pytorch_lightning`` has its own Strategy base classes and its own registry; a Trainer from
that package only accepts strategies derived from them. The hooks are shared through the mixin.
Imported by ``lightning_rannc/__init__.py`` only when ``pytorch_lightning`` is installed.
"""

from __future__ import annotations

import pytorch_lightning.strategies as pl_strategies

from lightning_rannc.strategy import RaNNCStrategyMixin

__all__ = ["RaNNCStrategy"]


class RaNNCStrategy(RaNNCStrategyMixin, pl_strategies.ParallelStrategy):  # type: ignore[misc]
    """``lightning_rannc.RaNNCStrategy`` for ``pytorch_lightning.Trainer``."""

    lightning_package = "pytorch_lightning"


RaNNCStrategy.register_strategies(pl_strategies.StrategyRegistry)
