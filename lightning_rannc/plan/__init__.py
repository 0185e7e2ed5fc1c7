"""The planner: from block costs and tensor sizes to a ``PartitionPlan``, in plain Python.

It owns the cost, memory and schedule models, the search over layouts and the plan file with
its text table. It imports nothing of the package beyond ``lightning_rannc.errors`` (no torch,
no capture, profile, runtime or report): the profiler fills its inputs, the runtime builds what
a plan says, and ``lightning_rannc.report`` draws plans and traces.
"""

__all__: list[str] = []
