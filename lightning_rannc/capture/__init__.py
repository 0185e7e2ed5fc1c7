"""Step 1, capture: the LightningModule's step as one exported graph, and cut into stages.

It owns the batch as the graph sees it (``batch``), the export of ``training_step`` and the
evaluation steps (``export``), what the step's ``self.log`` and torchmetrics calls record
(``recording``), what a captured step cannot repeat (``watching``: counters, side effects),
the module's tensors by canonical name and their fake stand-ins (``module_state``), our small
graph view (``graph``) and the stage modules cut from it (``split``).

May import: ``_compat``, ``_utils``, ``_rng``, ``errors``, torch and Lightning; nothing of
``plan``, ``profile``, ``runtime``, ``integration`` or ``strategy``.
"""

__all__: list[str] = []
