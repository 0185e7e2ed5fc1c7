"""What ``RaNNCStrategy``'s Lightning hooks delegate to.

``strategy.py`` holds only the hooks. The work they start lives here, one concern per module:
``layout`` (setup: the device description, the stages x replicas layout, the engine's options),
``evaluation`` (validation, test and predict loops through the pipeline, or on the whole module),
``checkpoints`` (full or sharded state of a partitioned module) and ``precision`` (gradient
clipping and loss-scaler decisions that must agree across ranks).

May import: config, capture, plan, profile, runtime, and Lightning. Nothing below imports this.
"""
