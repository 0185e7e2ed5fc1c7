"""RaNNC's ``verify_partitioning``: the first step run unpartitioned and pipelined, compared.

Before each rank frees the other stages' tensors, it runs the whole captured step on its own
batch, micro-batch by micro-batch, with the same random streams the stages use (so dropout
draws the same masks), and keeps the loss and the gradients of the parameters it holds. After
the first pipelined step the two are compared on every rank; the largest differences are
reported once and, above the tolerance, every rank raises.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lightning_rannc.capture.graph import StepGraph
from lightning_rannc.capture.split import build_range_module
from lightning_rannc.errors import RuntimeSetupError
from lightning_rannc.profile.profiler import buffers_restored
from lightning_rannc.runtime.mesh import ProcessGroups
from lightning_rannc.runtime.pipeline import SeededStage

__all__ = ["Reference", "reference_step", "check_against_reference"]

log = logging.getLogger("lightning_rannc")


@dataclass
class Reference:
    """The unpartitioned step on this rank's batch: mean loss over micro-batches, and the
    gradients of ``names`` (this rank's parameters)."""

    loss: float
    grads: dict[str, torch.Tensor]
    device: torch.device


def reference_step(
    graph: StepGraph,
    leaves: Sequence[torch.Tensor],
    num_microbatches: int,
    names: Collection[str],
    key: tuple[int, int, int],
    no_grad: Collection[str] = (),
    sum_loss: bool = False,
    loss_scale: float = 1.0,
) -> Reference:
    """Run the whole ``graph`` over ``leaves`` split into ``num_microbatches``; ``key`` is
    (seed, step, replica) of the random streams; ``sum_loss``: the loss sums over samples (the
    step's loss is then the sum over micro-batches); ``loss_scale``: the first step's 16-bit loss
    scale, applied in backward as the pipeline does (without it, gradients that underflow in
    fp16 would show as a partitioning error), and divided out of the gradients kept. Buffers and
    gradients are left as they were."""
    device = leaves[0].device
    stage = SeededStage(build_range_module(graph, 0, len(graph), detach=no_grad), key[2], device)
    stage.start_step(key[0], key[1])
    params = {n: graph.tensors[n] for n in sorted(names)}
    held = {n: p.grad for n, p in params.items()}
    for param in params.values():
        param.grad = None
    size = int(leaves[0].shape[0]) // num_microbatches
    total = 0.0
    divisor = 1 if sum_loss else num_microbatches
    with buffers_restored(graph):
        for m in range(num_microbatches):
            loss = stage(*[leaf[m * size : (m + 1) * size] for leaf in leaves])[0]
            (loss * (loss_scale / divisor)).backward()
            total += float(loss.detach())
    grads = {n: _unscaled_grad(p, loss_scale) for n, p in params.items()}
    for name, param in params.items():
        param.grad = held[name]
    return Reference(total / divisor, grads, device)


def _unscaled_grad(param: torch.Tensor, loss_scale: float) -> torch.Tensor:
    return (param.grad / loss_scale if param.grad is not None else torch.zeros_like(param)).detach()


def check_against_reference(
    reference: Reference,
    loss: float,
    grads: Mapping[str, torch.Tensor | None],
    groups: ProcessGroups,
    tolerance: float,
    loss_scale: float = 1.0,
    compared: Collection[str] | None = None,
) -> None:
    """Compare the pipelined step (``loss`` averaged over replicas, ``grads`` averaged over
    replicas and scaled by ``loss_scale``) with ``reference``. Collective.

    A gradient's difference is relative to the larger of its own largest value and a thousandth
    of this rank's largest gradient, so gradients that are zero in exact arithmetic (a bias
    before a normalisation) do not fail on rounding noise. A NaN difference fails; a first step
    that overflowed under loss scaling (the scaler skips it) is not compared."""
    ref_loss, ref_grads = _averaged_over_replicas(reference, groups)
    if compared is not None:  # ZeRO-2: a replica holds the gradients of its share only
        ref_grads = {n: g for n, g in ref_grads.items() if n in compared}
    ours = {n: _unscaled(grads.get(n), ref, loss_scale) for n, ref in ref_grads.items()}
    overflowed = loss_scale != 1.0 and not all(bool(torch.isfinite(g).all()) for g in ours.values())
    scale = max((float(g.float().abs().max()) for g in ref_grads.values() if g.numel()), default=1.0)
    worst_name, worst = "", 0.0
    for name, ref in ref_grads.items():
        floor = max(float(ref.float().abs().max()) if ref.numel() else 0.0, 1e-3 * scale, 1e-12)
        difference = float((ours[name] - ref.float()).abs().max()) / floor if ref.numel() else 0.0
        if math.isnan(difference) or difference > worst:
            worst_name, worst = name, math.inf if math.isnan(difference) else difference
    loss_difference = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
    loss_difference = math.inf if math.isnan(loss_difference) else loss_difference
    reports: list[tuple[float, str, float, bool]] = [(0.0, "", 0.0, False)] * dist.get_world_size()
    dist.all_gather_object(reports, (worst, worst_name, loss_difference, overflowed), group=groups.cpu_group)
    if any(r[3] for r in reports):
        if dist.get_rank() == 0:
            log.info("verify: not compared, the first step overflowed under loss scaling (the scaler skips it)")
        return
    _report([r[:3] for r in reports], tolerance)


def _unscaled(grad: torch.Tensor | None, like: torch.Tensor, loss_scale: float) -> torch.Tensor:
    return grad.float() / loss_scale if grad is not None else torch.zeros_like(like, dtype=torch.float32)


def _averaged_over_replicas(reference: Reference, groups: ProcessGroups) -> tuple[float, dict[str, torch.Tensor]]:
    if groups.num_replicas == 1:
        return reference.loss, reference.grads
    grads = {}
    for name, grad in sorted(reference.grads.items()):
        total = grad.clone()
        dist.all_reduce(total, group=groups.dp_group)
        grads[name] = total / groups.num_replicas
    # On every rank, whether or not its stage has parameters: the collectives must match.
    loss = torch.tensor([reference.loss], dtype=torch.float64, device=reference.device)
    dist.all_reduce(loss, group=groups.dp_group)
    return float(loss) / groups.num_replicas, grads


def _report(reports: list[tuple[float, str, float]], tolerance: float) -> None:
    """Log the largest differences on rank 0; raise on every rank above ``tolerance``."""
    rank, (worst, name, _) = max(enumerate(reports), key=lambda item: item[1][0])
    loss_difference = max(r[2] for r in reports)
    line = (
        f"verify: the pipelined first step against the unpartitioned one: loss differs by {loss_difference:.2e}, "
        f"gradients by at most {worst:.2e} (relative, `{name or '-'}` on rank {rank}); tolerance {tolerance:g}"
    )
    if dist.get_rank() == 0:
        log.info(line)
    if worst > tolerance or loss_difference > tolerance:
        raise RuntimeSetupError(
            line.replace("verify: ", "verify=True found a difference: ")
            + ". The partitioned step does not compute what your training_step does: please report it with "
            "the plan printed above."
        )
