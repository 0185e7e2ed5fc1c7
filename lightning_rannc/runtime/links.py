"""Measure the communication links at startup, so the planner predicts with them.

The planner prices the activation sends between pipeline stages and the gradient all-reduce of
the replicas with ``DeviceSpec.intra_node_bandwidth`` / ``inter_node_bandwidth``. The presets are
guesses for a typical machine; the real links (NVLink or PCIe, InfiniBand or Ethernet, gloo over
loopback) can differ by an order of magnitude, and so can the plan that is best for them. A short
ping-pong between two ranks of one node, two ranks of different nodes, and an all-reduce over the
world give latency and bandwidth from a fit ``time = latency + bytes / bandwidth``.

``measure_links`` is collective: every rank calls it, with the same arguments.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lightning_rannc.plan.devices import DeviceSpec

__all__ = ["LinkTimes", "LinkMeasurement", "measure_links", "apply_links", "fit_link"]

_MIN_LATENCY_MS = 1e-6
"""Floor of a fitted latency (1 ns): a noisy fit can put the intercept at or below zero."""
_MIN_TIME_MS = 1e-6


@dataclass(frozen=True)
class LinkTimes:
    """A transfer of ``nbytes`` takes ``latency_ms + nbytes / bandwidth`` (bandwidth in bytes/s)."""

    latency_ms: float
    bandwidth: float

    def transfer_ms(self, nbytes: float) -> float:
        return self.latency_ms + nbytes / self.bandwidth * 1e3


@dataclass(frozen=True)
class LinkMeasurement:
    """Measured links of this job; ``None`` where the job has no such link."""

    intra_node: LinkTimes | None
    """Point-to-point between two ranks of one node (ranks 0 and 1)."""
    inter_node: LinkTimes | None
    """Point-to-point between ranks of two nodes (ranks 0 and ``local_world_size``)."""
    allreduce: LinkTimes | None
    """All-reduce over the whole world, per byte of the reduced tensor."""

    def describe(self) -> str:
        """One log line, e.g. ``links: intra-node 2.1 GB/s + 0.12 ms, inter-node -, all-reduce ...``."""
        parts = [
            f"{name} {_describe_times(times)}"
            for name, times in (("intra-node", self.intra_node), ("inter-node", self.inter_node))
        ]
        parts.append(f"all-reduce {_describe_times(self.allreduce)}")
        return "links: " + ", ".join(parts)


def _describe_times(times: LinkTimes | None) -> str:
    if times is None:
        return "-"
    return f"{times.bandwidth / 1e9:.3g} GB/s + {times.latency_ms:.3g} ms"


def fit_link(nbytes: Sequence[float], times_ms: Sequence[float]) -> LinkTimes:
    """Least-squares fit of ``time = latency + bytes / bandwidth``, clamped to positive values.

    If larger transfers were not slower (noise), the whole time of the largest one counts as
    bandwidth-bound."""
    if len(nbytes) != len(times_ms) or len(set(nbytes)) < 2:
        raise ValueError("fit_link needs times of at least two different sizes")
    mean_x, mean_y = statistics.fmean(nbytes), statistics.fmean(times_ms)
    sxx = sum((x - mean_x) ** 2 for x in nbytes)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(nbytes, times_ms))
    slope = sxy / sxx  # ms per byte
    if slope <= 0:
        largest = max(range(len(nbytes)), key=lambda k: nbytes[k])
        slope = max(times_ms[largest], _MIN_TIME_MS) / nbytes[largest]
        return LinkTimes(latency_ms=max(min(times_ms), _MIN_LATENCY_MS), bandwidth=1e3 / slope)
    latency = mean_y - slope * mean_x
    return LinkTimes(latency_ms=max(latency, _MIN_LATENCY_MS), bandwidth=1e3 / slope)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ping_pong_ms(peer: int, initiator: bool, tensor: torch.Tensor, repeats: int) -> list[float]:
    """Round trips with ``peer``: a warm-up, then ``repeats`` timed ones (timed on the initiator)."""
    times = []
    for round_ in range(repeats + 1):
        _sync(tensor.device)
        start = time.perf_counter()
        if initiator:
            dist.send(tensor, peer)
            dist.recv(tensor, peer)
        else:
            dist.recv(tensor, peer)
            dist.send(tensor, peer)
        _sync(tensor.device)
        if round_:
            times.append((time.perf_counter() - start) * 1e3)
    return times


def _measure_pair(pair: tuple[int, int], device: torch.device, sizes: Sequence[int], repeats: int) -> LinkTimes | None:
    """One-way times between ``pair`` (known on its first rank); other ranks return ``None``."""
    rank = dist.get_rank()
    if rank not in pair:
        return None
    initiator = rank == pair[0]
    peer = pair[1] if initiator else pair[0]
    one_way = []
    for size in sizes:
        tensor = torch.zeros(_numel(size), dtype=torch.float32, device=device)
        one_way.append(statistics.median(_ping_pong_ms(peer, initiator, tensor, repeats)) / 2)
    return fit_link([_numel(s) * 4 for s in sizes], one_way) if initiator else None


def _measure_allreduce(device: torch.device, sizes: Sequence[int], repeats: int) -> LinkTimes:
    """All-reduce times over the world (this rank's clock); a warm-up call per size first."""
    medians = []
    for size in sizes:
        tensor = torch.zeros(_numel(size), dtype=torch.float32, device=device)
        times = []
        for round_ in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            dist.all_reduce(tensor)
            _sync(device)
            if round_:
                times.append((time.perf_counter() - start) * 1e3)
        medians.append(statistics.median(times))
    return fit_link([_numel(s) * 4 for s in sizes], medians)


def _numel(nbytes: int) -> int:
    return max(nbytes // 4, 1)


def measure_links(
    device: torch.device, local_world_size: int, sizes: Sequence[int] = (2**12, 2**22), repeats: int = 5
) -> LinkMeasurement:
    """Measure the links of the default process group. Collective: call on every rank.

    ``sizes`` are bytes per transfer (float32 tensors); ranks 0 and 1 measure the intra-node link
    (if ``local_world_size >= 2``), ranks 0 and ``local_world_size`` the inter-node one (if the
    world spans several nodes). Rank 0's numbers are broadcast, so every rank returns the same."""
    if local_world_size < 1 or repeats < 1 or len({_numel(s) for s in sizes}) < 2:
        raise ValueError(
            f"measure_links needs local_world_size >= 1, repeats >= 1 and two different sizes; got "
            f"local_world_size={local_world_size}, repeats={repeats}, sizes={tuple(sizes)}"
        )
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return LinkMeasurement(intra_node=None, inter_node=None, allreduce=None)
    world_size = dist.get_world_size()
    intra = _measure_pair((0, 1), device, sizes, repeats) if local_world_size >= 2 else None
    inter = _measure_pair((0, local_world_size), device, sizes, repeats) if world_size > local_world_size else None
    allreduce = _measure_allreduce(device, sizes, repeats)
    result = [LinkMeasurement(intra_node=intra, inter_node=inter, allreduce=allreduce)]
    dist.broadcast_object_list(result, src=0, device=device if device.type == "cuda" else None)
    return result[0]


def apply_links(spec: DeviceSpec, links: LinkMeasurement) -> DeviceSpec:
    """``spec`` with the measured point-to-point bandwidths and latency (the slower link's) and
    the measured all-reduce; what was not measured keeps the preset's values."""
    if links.intra_node is not None:
        spec = dataclasses.replace(spec, intra_node_bandwidth=links.intra_node.bandwidth)
    if links.inter_node is not None:
        spec = dataclasses.replace(spec, inter_node_bandwidth=links.inter_node.bandwidth)
    latencies = [link.latency_ms for link in (links.intra_node, links.inter_node) if link is not None]
    if latencies:
        spec = dataclasses.replace(spec, link_latency_ms=max(latencies))
    if links.allreduce is not None:
        reduce = links.allreduce
        spec = dataclasses.replace(spec, allreduce_bandwidth=reduce.bandwidth, allreduce_latency_ms=reduce.latency_ms)
    return spec
