"""Step 2, profile: what each block of the captured graph costs.

It owns the measured costs (``profiler``: forward and backward time and saved activations per
block, on the real device), the analytic ones for modules on the meta device and dry runs
(``analytic``: FLOPs and bytes on fake tensors, for a device preset), their cache on disk
(``cache``) and the tensor sizes the memory model needs (``tensors``).

May import: ``capture`` (the graph and its stage modules), ``plan`` (the cost and memory
records it fills), ``_compat``, torch; nothing of ``runtime``, ``integration`` or ``strategy``.
"""

__all__: list[str] = []
