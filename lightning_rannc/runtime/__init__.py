"""Step 4, runtime: build each rank's stages from the plan and run them.

It owns the engine that builds the pipeline at the first batch (``engine``: capture, plan on
rank 0, agree, materialise this rank's tensors), the built pipeline and what exists after the
first batch (``built``), planning on rank 0 (``planning``, ``captures``, ``agreement``), the
stages and schedules of one batch shape (``pipeline``), evaluation through the plan
(``evaluation``), log and metric replay (``replay``), the process groups (``mesh``), sharded
optimizer state (``optim``), where tensors live (``state``), checkpoints (``checkpoint``),
link timing (``links``), the runtime trace (``trace``), ``verify`` and the failure watchdog.

May import: ``capture``, ``profile``, ``plan``, ``report`` (trace event builders), ``config``,
``_compat``, torch and torch.distributed; nothing of ``integration`` or ``strategy``.
"""

__all__: list[str] = []
