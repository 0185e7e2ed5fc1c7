"""Device descriptions for planning without the hardware (analytic costs, dry runs).

Throughputs are what dense matmuls *achieve*, not datasheet peaks: the analytic cost model
divides FLOPs by them. The H100 figures are measured (``shared/data/h100_profile.json``: fp32
without TF32 51.6 TFLOP/s, bf16 787 TFLOP/s, copies 3.0 TB/s); the others are datasheet peaks
scaled by the same achieved/peak ratio (fp32 0.77, half 0.8, memory 0.9).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lightning_rannc.errors import PlanError

__all__ = ["DeviceSpec", "DEVICES", "get_device", "parse_bytes"]


@dataclass(kw_only=True, frozen=True)
class DeviceSpec:
    """What the planner needs to know about one accelerator and its links."""

    name: str
    flops_per_s: dict[str, float] = field(hash=False)
    """Achieved dense matmul FLOP/s by dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``)."""
    memory_bandwidth: float
    """Achieved device memory bandwidth, bytes/s (read + write)."""
    memory_bytes: int
    """Memory per device, as CUDA reports it (an "80GB" H100 has 85.0e9 bytes)."""
    intra_node_bandwidth: float
    """Point-to-point bytes/s between devices of one node (NVLink)."""
    inter_node_bandwidth: float
    """Point-to-point bytes/s between devices of different nodes (per device)."""
    op_overhead_ms: float
    """Host time (Python, dispatcher, launch) per graph node that launches device kernels; nodes
    that only make views cost none. Kernels run asynchronously, so a forward takes at least the
    host time of its nodes (see ``lightning_rannc.profile.analytic``)."""
    link_latency_ms: float = 0.0
    """Fixed time of one point-to-point message, on top of bytes / bandwidth."""
    allreduce_bandwidth: float | None = None
    """Bytes of the reduced tensor per second of an all-reduce, as measured at startup;
    ``None``: a ring over the links."""
    allreduce_latency_ms: float = 0.0
    """Fixed time of one measured all-reduce."""
    action_overhead_ms: float = 0.0
    """Time the pipelined runtime adds to each forward or backward of a stage beyond its compute
    (``torch.distributed.pipelining`` bookkeeping, posting and waiting on sends and receives)."""
    step_overhead_ms: float = 0.0
    """Time a training step adds beyond the schedule, the gradient exchange and the optimizer
    (the training loop and its hooks, the step's small collectives)."""
    gather_overhead_ms: float = 0.0
    """Host time of one ZeRO-3 unit's gather or gradient reduce beyond its operators' launches
    (the collective's call, its hooks; on a CPU, gloo's own work on the compute's cores)."""
    host_bandwidth: float | None = None
    """Bytes/s between the device and host memory (pinned, PCIe) for optimizer offload;
    ``None``: ``memory_bandwidth`` (the device is the host: a copy)."""
    host_step_bandwidth: float | None = None
    """Bytes/s the host streams through an offloaded optimizer step, per device (a node's CPUs
    are shared by its devices); ``None``: ``memory_bandwidth``."""
    schedule_margin: float = 0.0
    """Where the search chooses them, interleaving and zero bubble must be predicted this share
    faster than the plan without them: the model's error for them on this device."""
    checkpointed_forward_share: float = 0.0
    """What a recomputed block's first forward adds under ``torch.utils.checkpoint``, as a share
    of its forward time (non-reentrant checkpointing frees what the block would save for backward
    and runs each saved tensor through a hook; backward then recomputes the forward whole)."""
    host_is_device: bool = False
    """The device's memory is the host's (a CPU): offloading the optimizer state frees none of
    it, so the search does not choose offload there (forced, it runs: a copy)."""
    sends_occupy_compute: bool = False
    """Moving a message between stages takes the compute's own cores at both ends (gloo over
    the loopback on a CPU copies it through the kernel on the cores the stages compute on), so
    each stage's passes are charged its messages' bytes / bandwidth on top of their compute."""

    def matmul_flops(self, dtype_name: str) -> float:
        return self.flops_per_s.get(dtype_name, self.flops_per_s["float32"])

    def link_bandwidth(self, across_nodes: bool) -> float:
        return self.inter_node_bandwidth if across_nodes else self.intra_node_bandwidth


_GB = 1e9
DEVICES: dict[str, DeviceSpec] = {
    "h100": DeviceSpec(
        name="h100",
        flops_per_s={"float32": 51.6e12, "bfloat16": 787e12, "float16": 787e12},
        memory_bandwidth=3000 * _GB,
        memory_bytes=85_017_493_504,
        intra_node_bandwidth=450 * _GB,
        inter_node_bandwidth=50 * _GB,
        # Offload: PCIe 5 x16 pinned copies, and 8 devices sharing a host's memory bandwidth;
        # estimates, not measured (nothing here has run offloaded on a GPU).
        host_bandwidth=25 * _GB,
        host_step_bandwidth=10 * _GB,
        # Fit to eager HF models at batch 1 (tests/unit/test_calibration.py): BERT-base is
        # launch-bound, 7.9 ms for 157 launching nodes (0.050 ms each); GPT-2 small is
        # device-bound at 10.0 ms, so its 238 launching nodes take less (under 0.042 ms each).
        op_overhead_ms=0.044,
    ),
    "a100": DeviceSpec(
        name="a100",
        flops_per_s={"float32": 15.0e12, "bfloat16": 250e12, "float16": 250e12},
        memory_bandwidth=1800 * _GB,
        memory_bytes=85_198_045_184,
        intra_node_bandwidth=300 * _GB,
        inter_node_bandwidth=25 * _GB,
        host_bandwidth=20 * _GB,  # PCIe 4 x16, estimated as for the h100
        host_step_bandwidth=10 * _GB,
        op_overhead_ms=0.025,
    ),
    "v100": DeviceSpec(
        name="v100",
        flops_per_s={"float32": 12.1e12, "float16": 100e12},
        memory_bandwidth=810 * _GB,
        memory_bytes=34_089_730_048,
        intra_node_bandwidth=150 * _GB,
        inter_node_bandwidth=12.5 * _GB,
        host_bandwidth=10 * _GB,  # PCIe 3 x16, estimated as for the h100
        host_step_bandwidth=10 * _GB,
        op_overhead_ms=0.03,
    ),
    "cpu": DeviceSpec(
        name="cpu",
        flops_per_s={"float32": 50e9, "bfloat16": 25e9},
        memory_bandwidth=10 * _GB,
        memory_bytes=16 * 2**30,
        intra_node_bandwidth=2 * _GB,
        inter_node_bandwidth=1.25 * _GB,
        op_overhead_ms=0.01,
        # Per action: what two busy gloo processes on a 2-core machine add to a stage's forward
        # or backward beyond its blocks' profile (which leaves out each block's own backward
        # call, `profile/profiler.py`): fit to three `benchmarks/throughput.py` sweeps of every
        # schedule and ZeRO stage (developer session 24; 1.3-1.5 ms where the step overhead
        # was fitted too, which then absorbed a noisy machine into 19 ms). A traced 1F1B step
        # with 8 micro-batches spent about 1.6 ms an action between and around its actions.
        # 0.7 before the profile left the block calls out.
        action_overhead_ms=1.2,
        # Per step, from runtime traces of every layout of the example GPT (`throughput.py
        # --trace`, developer session 20): Lightning's loop between steps about 3.4 ms (the
        # measured step less the trace's), the small collectives after the schedule (tied-weight
        # sum, the loss shared) about 2 ms on the rank that waits least, and the optimizer step
        # about 1 ms more than its memory-bound estimate. The 15 ms fitted before with the action
        # overhead made every pipeline plan's prediction 5-10% long.
        step_overhead_ms=7.0,
        # Per ZeRO-3 unit gathered or reduced: about 0.8 ms a unit on the 2-core machine with the
        # unit's 4 operator launches (developer session 21, when the action overhead, 0.7 ms then,
        # stood for it). With the action overhead at 1.2 ms, ZeRO-3 measured 0.90 of its
        # prediction in all five repetitions of a quiet sweep (developer session 25).
        gather_overhead_ms=0.75,
        # Interleaved and zero-bubble steps measure 0.78-0.94 of their predictions there, GPipe
        # and 1F1B 0.94-1.10 (`benchmarks/throughput.py --memory-limit 30MB`, developer session
        # 14): they make more actions and sends per micro-batch than the model charges. Chosen
        # where predicted only 5% faster, they measured 15-25% slower than 1F1B.
        schedule_margin=0.1,
        # Measured on issue 17's large-head GPT (32k-word head, developer session 17): a plan
        # sending the head's 64 MiB of logits to the loss on the other rank, 4 micro-batches each
        # way, measured 0.80-0.83 of its prediction while the sends only delayed their receivers.
        sends_occupy_compute=True,
        # One process, the example GPT's 8 blocks each in a non-reentrant checkpoint against
        # plain (developer session 19): forward 15.95 -> 18.29 ms at 4 x 64 tokens, 8.87 -> 9.98 at
        # 2 x 64, 88.6 -> 99.5 at dim 256 x 128 tokens (12-15%); in the runtime, on a quiet minute,
        # a plan recomputing its 8 blocks measured a forward of 18.4 ms where 15.0 were predicted.
        # Not measured on a GPU (the presets there leave it 0).
        checkpointed_forward_share=0.15,
        host_is_device=True,
    ),
}


def get_device(name: str) -> DeviceSpec:
    """A preset by name (case-insensitive)."""
    try:
        return DEVICES[name.lower()]
    except KeyError:
        raise PlanError(f"Unknown device preset {name!r}; known: {sorted(DEVICES)}.") from None


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str | int | float) -> int:
    """``"80GB"`` -> 80e9, ``"16GiB"`` -> 16 * 2**30; numbers are bytes already."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    unit = match[2].lower() if match else ""
    if not match or unit not in _UNITS:
        raise PlanError(f"Cannot read {text!r} as a memory size; write e.g. '80GB', '16GiB' or a number of bytes.")
    return int(float(match[1]) * _UNITS[unit])
