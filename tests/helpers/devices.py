"""A device description for planner tests: no overheads, fixed bandwidths, chosen memory."""

from __future__ import annotations

from lightning_rannc.plan.devices import DeviceSpec

__all__ = ["test_device"]


def test_device(memory_bytes: int = 10**9) -> DeviceSpec:
    """Stage times are the blocks' own; links at 1 GB/s within a node, 0.1 GB/s across."""
    return DeviceSpec(
        name="test",
        flops_per_s={"float32": 1e12},
        memory_bandwidth=1e12,
        memory_bytes=memory_bytes,
        intra_node_bandwidth=1e9,
        inter_node_bandwidth=1e8,
        op_overhead_ms=0.0,
    )


test_device.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test
