"""Presentation of plans and traces: pictures and files for people, never read back by the planner.

It owns the Gantt charts of a planned step (``chart``, with matplotlib), the Chrome trace files
(``chrome_trace``: the event builders the runtime trace uses too, and the predicted step as a
trace), reading a measured step back from a runtime trace (``measured``) and setting a plan's
predicted actions beside a trace's medians (``compare``). It may import
``lightning_rannc.plan`` (plans, simulated schedules) and ``lightning_rannc.errors``, but nothing
of ``runtime`` or ``strategy``: the runtime imports the event builders from here, not the reverse.
"""

__all__: list[str] = []
