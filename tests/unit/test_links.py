"""Link measurement without a second process: the fit, the spec update, and a world of one rank."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lightning_rannc.plan.devices import get_device
from lightning_rannc.runtime import links as links_module
from lightning_rannc.runtime.links import LinkMeasurement, LinkTimes, apply_links, fit_link, measure_links


@pytest.mark.parametrize("sizes", [(2**12, 2**22), (2**10, 2**16, 2**20, 2**24)])
def test_fit_recovers_latency_and_bandwidth_exactly(sizes: tuple[int, ...]) -> None:
    truth = LinkTimes(latency_ms=0.12, bandwidth=2.1e9)
    fitted = fit_link(sizes, [truth.transfer_ms(size) for size in sizes])
    assert fitted.latency_ms == pytest.approx(truth.latency_ms, rel=1e-9)
    assert fitted.bandwidth == pytest.approx(truth.bandwidth, rel=1e-9)


def test_transfer_ms() -> None:
    assert LinkTimes(latency_ms=0.5, bandwidth=1e9).transfer_ms(2e6) == pytest.approx(2.5)


def test_fit_clamps_to_positive_values() -> None:
    # The small transfer took longer than a line through the origin allows: negative intercept.
    steep = fit_link([1000, 2000], [0.001, 1.0])
    assert steep.latency_ms > 0 and steep.bandwidth == pytest.approx(1000 / 0.999 * 1e3)
    # The large transfer was not slower (noise): all of its time counts as bandwidth-bound.
    flat = fit_link([1000, 2000], [0.5, 0.4])
    assert flat.latency_ms == pytest.approx(0.4)
    assert flat.bandwidth == pytest.approx(2000 / 0.4 * 1e3)
    with pytest.raises(ValueError):
        fit_link([1000, 1000], [0.1, 0.2])


def test_apply_links_replaces_only_measured_bandwidths_and_the_latency() -> None:
    spec = get_device("h100")
    measured = LinkTimes(latency_ms=0.1, bandwidth=3.3e9)
    intra_only = apply_links(spec, LinkMeasurement(intra_node=measured, inter_node=None, allreduce=measured))
    assert intra_only.intra_node_bandwidth == 3.3e9 and intra_only.link_latency_ms == 0.1
    assert (intra_only.allreduce_bandwidth, intra_only.allreduce_latency_ms) == (3.3e9, 0.1)
    unchanged = dataclasses.replace(
        intra_only,
        intra_node_bandwidth=spec.intra_node_bandwidth,
        link_latency_ms=0.0,
        allreduce_bandwidth=None,
        allreduce_latency_ms=0.0,
    )
    assert unchanged == spec
    inter_only = apply_links(spec, LinkMeasurement(intra_node=None, inter_node=measured, allreduce=None))
    assert inter_only.inter_node_bandwidth == 3.3e9
    assert dataclasses.replace(inter_only, inter_node_bandwidth=spec.inter_node_bandwidth, link_latency_ms=0.0) == spec
    slower = LinkTimes(latency_ms=0.7, bandwidth=1e9)
    both = apply_links(spec, LinkMeasurement(intra_node=measured, inter_node=slower, allreduce=None))
    assert both.link_latency_ms == 0.7
    reduce_only = apply_links(spec, LinkMeasurement(intra_node=None, inter_node=None, allreduce=measured))
    assert dataclasses.replace(reduce_only, allreduce_bandwidth=None, allreduce_latency_ms=0.0) == spec


def test_describe() -> None:
    times = LinkTimes(latency_ms=0.12, bandwidth=2.1e9)
    line = LinkMeasurement(intra_node=times, inter_node=None, allreduce=times).describe()
    assert line == "links: intra-node 2.1 GB/s + 0.12 ms, inter-node -, all-reduce 2.1 GB/s + 0.12 ms"


def test_world_of_one_rank_measures_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    none = LinkMeasurement(intra_node=None, inter_node=None, allreduce=None)
    assert measure_links(torch.device("cpu"), 1) == none  # no process group at all
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=30))

    def no_collectives(*args: object, **kwargs: object) -> None:
        raise AssertionError("measure_links communicated in a world of one rank")

    for name in ("send", "recv", "all_reduce", "broadcast_object_list", "barrier"):
        monkeypatch.setattr(links_module.dist, name, no_collectives)
    assert measure_links(torch.device("cpu"), 1) == none
    assert measure_links(torch.device("cpu"), 8) == none


@pytest.mark.parametrize(
    "arguments",
    [{"local_world_size": 0}, {"local_world_size": 2, "repeats": 0}, {"local_world_size": 2, "sizes": (8, 8)}],
)
def test_bad_arguments_fail_before_communicating(arguments: dict) -> None:
    with pytest.raises(ValueError, match="measure_links needs"):
        measure_links(torch.device("cpu"), **arguments)
