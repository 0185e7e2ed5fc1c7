"""Memory one device needs to train one pipeline stage.

Pure arithmetic on byte counts, shared by the search (which never exceeds a limit) and the
plan table (which shows the breakdown). The single-device case is checked against peak memory
measured on an H100 in ``tests/unit/test_calibration.py``. ``TensorTable`` is the model's side of
the input: the sizes of the graph's parameters and buffers, which the profiler fills from the
captured step (``profile/tensors.py``) without importing the search.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from lightning_rannc.errors import PlanError

__all__ = [
    "TensorTable",
    "StageMemory",
    "stage_memory",
    "busiest_share",
    "shard_over_replicas",
    "in_flight_microbatches",
    "optimizer_state_factor",
    "OPTIMIZER_STATE",
]

PENDING_GRADIENT_SHARE = 0.5
"""Zero bubble: what a micro-batch between its input and weight pass keeps (the gradients of the
weight operations' outputs, for the weight pass), as a share of the activations it saved. A
transformer layer's linear and norm outputs are about half the values its operators save.
Measured on 2 CPU processes (``benchmarks/memory.py`` with zero bubble, the last stage of 2):
without this term 1.48x the prediction (session 14, when the sends held to the step's end were
not counted either); with a whole set of activations, once those were, 0.83-0.85."""

OPTIMIZER_STATE = {
    "adam": 2.0,
    "adamw": 2.0,
    "sgd": 0.0,
    "sgd_momentum": 1.0,
    "rmsprop": 1.0,
    "adagrad": 1.0,
}
"""Optimizer state per byte of trainable parameter (Adam keeps two moments, SGD with momentum one)."""


@dataclass(frozen=True)
class TensorTable:
    """Sizes of the graph's parameters and buffers by canonical name."""

    nbytes: Mapping[str, int]
    numel: Mapping[str, int]
    trainable: frozenset[str]


def optimizer_state_factor(optimizer: str) -> float:
    """State bytes per trainable parameter byte for an optimizer name (``"adam"``, ``"sgd"``, ...)."""
    try:
        return OPTIMIZER_STATE[optimizer.lower()]
    except KeyError:
        raise PlanError(
            f"Unknown optimizer {optimizer!r} for the memory model; known: {sorted(OPTIMIZER_STATE)}."
        ) from None


@dataclass(kw_only=True, frozen=True)
class StageMemory:
    """Predicted bytes on one device, by what holds them."""

    params: int
    grads: int
    """Gradients; or, when the optimizer step is the peak, gradients and the step's temporaries."""
    optimizer: int
    activations: int
    """Saved activations of the micro-batches in flight, plus one running micro-batch's workspace."""
    buffers: int
    """Point-to-point receive buffers and outputs waiting for their gradient."""
    shared: int = 0
    """Bytes counted in both ``grads`` and ``activations`` that never live at once: gradients
    made while backward frees activations (one micro-batch), or the optimizer step's, made after
    the activations are gone. The total counts them once."""

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.buffers - self.shared

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def shard_over_replicas(sizes: Mapping[str, int], num_replicas: int) -> dict[str, int]:
    """Assign each tensor to the replica that updates it (and with ZeRO-3 holds it): largest
    first, to the least loaded. Shares are whole tensors, so the busiest replica may hold more
    than ``1 / D`` (a huge embedding is one replica's alone): ``busiest_share``."""
    load = [0] * num_replicas
    owner: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        replica = load.index(min(load))
        owner[name] = replica
        load[replica] += sizes[name]
    return owner


def busiest_share(sizes: Sequence[int], num_replicas: int) -> int:
    """The busiest replica's share when ``shard_over_replicas`` splits tensors of these sizes:
    the same rule, without the names (which replica gets a tie changes no load)."""
    if len(sizes) <= num_replicas:
        return max(sizes, default=0)
    loads = [0] * num_replicas
    for size in sorted(sizes, reverse=True):
        heapq.heapreplace(loads, loads[0] + size)
    return max(loads)


def in_flight_microbatches(
    schedule: str, position: int, pipeline_stages: int, num_microbatches: int, virtual_stages: int = 1
) -> int:
    """Micro-batches whose activations a stage at ``position`` holds at once.

    GPipe runs every forward before any backward: all ``M``. 1F1B starts backward as soon as the
    last stage can, so position ``p`` holds ``S - p``. Interleaved 1F1B warms up with
    ``2 (S - p - 1) + (V - 1) S`` chunks (Megatron-LM's schedule), spread over ``V`` stages.
    """
    if schedule == "gpipe":
        return num_microbatches
    if schedule == "1f1b":
        return min(num_microbatches, pipeline_stages - position)
    chunks = 2 * (pipeline_stages - position - 1) + (virtual_stages - 1) * pipeline_stages + 1
    return min(num_microbatches, math.ceil(chunks / virtual_stages))


def stage_memory(
    *,
    param_bytes: int,
    trainable_bytes: int,
    activation_bytes: int,
    input_bytes: int,
    output_bytes: int,
    in_flight: int,
    num_microbatches: int,
    checkpoint: bool,
    optimizer_factor: float,
    num_replicas: int = 1,
    shard_optimizer: bool = True,
    workspace_bytes: int = 0,
    ddp: bool = False,
    largest_trainable_bytes: int | None = None,
    zero_bubble: bool = False,
    accumulating: bool = False,
    shard_gradients: bool = False,
    recomputed_bytes: int = 0,
    offload_optimizer: bool = False,
    shard_parameters: bool = False,
    largest_param_bytes: int = 0,
    weight_pending: int = 0,
    sends_held: bool = False,
    share_bytes: int | None = None,
) -> StageMemory:
    """Peak memory of a stage on one device.

    Args:
        param_bytes: parameters and buffers the stage holds (and autocast's half-precision copies).
        trainable_bytes: the part of them that gets gradients and optimizer state.
        activation_bytes: bytes autograd saves for backward in one micro-batch.
        input_bytes: bytes the stage receives per micro-batch (kept when checkpointing).
        output_bytes: bytes it sends per micro-batch.
        in_flight: micro-batches between their forward and their backward at once.
        num_microbatches: micro-batches per step.
        checkpoint: activations are recomputed in backward, so only the inputs stay.
        optimizer_factor: optimizer state bytes per trainable byte (``optimizer_state_factor``).
        num_replicas: data-parallel replicas of the stage.
        shard_optimizer: optimizer state is split over the replicas (ZeRO-1 and 2).
        workspace_bytes: bytes one running micro-batch holds beyond its saved activations
            (gradients in flight, temporaries: the largest ``BlockCost.workspace_bytes`` of the
            stage); only one micro-batch runs at a time, so it counts once.
        ddp: the replicas exchange gradients through DDP's buckets (``runtime/pipeline.py``).
        largest_trainable_bytes: the optimizer steps tensor by tensor (torch's default on the
            CPU), and this is its largest tensor; ``None``: it steps every tensor at once (foreach).
        zero_bubble: backward is split in two, and a micro-batch's received values live until its
            weight pass.
        accumulating: gradients are accumulated over several batches (Lightning's
            ``accumulate_grad_batches``): the earlier batches' gradients live through the schedule
            beside the new ones (``PipelineRuntime.run`` holds them aside).
        shard_gradients: after the schedule each replica keeps only the gradients of its share
            (ZeRO-2): they are reduced to it one share at a time (a flat copy of one share), the
            rest freed, so the accumulation window and the optimizer step hold ``1 / D``.
        recomputed_bytes: selective checkpointing: the activations of the stage's first layers,
            recomputed in backward for one micro-batch at a time (``activation_bytes`` is then
            what the other layers keep per micro-batch in flight).
        offload_optimizer: the optimizer state and its step live in host memory: the device
            holds neither the state nor the step's temporaries.
        shard_parameters: ZeRO-3: each replica holds ``1 / D`` of the trainable parameters and
            of their gradients (reduced onto it micro-batch by micro-batch); the others are
            gathered where they are used, so beside them live the parameter being used, the next
            one (prefetched) and one gathered again in backward, and two micro-batch gradients
            of one (one reducing while the next is made).
        largest_param_bytes: the stage's largest trainable tensor (ZeRO-3's gathers).
        weight_pending: zero bubble: the most micro-batches between their input and weight
            pass (``simulate.weight_passes_pending``). Each keeps the gradients of its weight
            operations' outputs, costed as ``PENDING_GRADIENT_SHARE`` of its activations.
        sends_held: the schedule runs on torch's ``_PipelineScheduleRuntime`` (interleaved or
            zero bubble), which waits on its sends only when the step ends: each micro-batch's
            sent outputs and input gradients live until then. Measured with zero bubble
            (``benchmarks/memory.py``, 16 and 32 micro-batches): both ranks' peaks grew by the
            cut's bytes per micro-batch (131 KiB at a layer boundary, 514 KiB after an
            attention's qkv projection).
        share_bytes: where something is split over the replicas (optimizer state, ZeRO-2's
            gradients, ZeRO-3's parameters), the trainable bytes of the busiest replica's share
            (``busiest_share``: shares are whole tensors); ``None``: an even split.
    """
    share = trainable_bytes // num_replicas if share_bytes is None else min(trainable_bytes, share_bytes)
    if shard_parameters:
        # Costed as one replica holding its share of the gradients plus two micro-batch gradients
        # of one parameter (reducing), then given its share of the parameters and state.
        return dataclasses.replace(
            stage_memory(
                param_bytes=param_bytes,
                trainable_bytes=share + 2 * largest_param_bytes,
                activation_bytes=activation_bytes,
                input_bytes=input_bytes,
                output_bytes=output_bytes,
                in_flight=in_flight,
                num_microbatches=num_microbatches,
                checkpoint=checkpoint,
                optimizer_factor=0.0 if offload_optimizer else optimizer_factor,
                workspace_bytes=workspace_bytes,
                largest_trainable_bytes=largest_trainable_bytes,
                accumulating=accumulating,
                recomputed_bytes=recomputed_bytes,
                offload_optimizer=offload_optimizer,
                sends_held=sends_held,
            ),
            params=param_bytes - trainable_bytes + share + 3 * largest_param_bytes,
            optimizer=0 if offload_optimizer else int(optimizer_factor * share),
        )
    if checkpoint:
        # One micro-batch being recomputed; the inputs kept for the others are the receive
        # buffers (``buffers``), which hold the input of every micro-batch in flight.
        # With zero bubble each pending weight pass keeps its gradients; what the input pass
        # recomputed is freed once read (the weight pass recomputes it again).
        activations = int((1 + PENDING_GRADIENT_SHARE * weight_pending) * activation_bytes) + workspace_bytes
    else:
        pending = PENDING_GRADIENT_SHARE * weight_pending
        activations = int((in_flight + pending) * activation_bytes) + workspace_bytes + recomputed_bytes
    stepped = share if shard_optimizer else trainable_bytes  # the optimizer state this replica keeps
    # With one micro-batch, backward frees activations while it makes the gradients; with more,
    # the gradients of finished micro-batches live next to the activations of the others.
    backward = activations + trainable_bytes if num_microbatches > 1 else max(activations, trainable_bytes)
    if ddp and num_microbatches > 1:
        # The micro-batches before the last run under `no_sync` and accumulate into fresh
        # gradients (not bucket views: the runtime takes the gradients out between steps), which
        # the last backward copies into DDP's buckets: both copies live at its end.
        backward += trainable_bytes
    kept = share if shard_gradients else trainable_bytes  # the gradients kept for the step
    if accumulating:
        backward += kept
    # The optimizer step runs after the activations are gone, next to the gradients. PyTorch's
    # default (foreach) Adam/AdamW, RMSprop and Adagrad make one temporary as large as the state
    # they update (the square root of the second moment): measured on an H100, BERT-base at
    # batch 1 peaks there at 5.0x its parameter bytes (params, grads, 2 moments, temporary).
    # Counted for every stateful optimizer (for SGD with momentum it is an over-estimate).
    temporary = stepped if optimizer_factor > 0 and not offload_optimizer else 0
    if largest_trainable_bytes is not None:  # the loop's square root and its quotient, one tensor at a time
        temporary = min(temporary, 2 * largest_trainable_bytes)
    stepping = int(kept + temporary)
    if shard_gradients:  # the reduction to the owners: every gradient and one share's flat copy
        held = share if accumulating else 0
        stepping = max(stepping, trainable_bytes + share + held)
    live = max(backward, stepping)
    grads = stepping if stepping >= backward else trainable_bytes
    return StageMemory(
        params=param_bytes,
        grads=grads,
        optimizer=0 if offload_optimizer else int(optimizer_factor * stepped),
        activations=activations,
        buffers=_buffer_bytes(input_bytes, output_bytes, in_flight, num_microbatches, zero_bubble, sends_held),
        shared=activations + grads - live,
    )


def _buffer_bytes(
    input_bytes: int,
    output_bytes: int,
    in_flight: int,
    num_microbatches: int,
    zero_bubble: bool = False,
    sends_held: bool = False,
) -> int:
    """Bytes the pipeline holds beside activations and gradients.

    - Receive buffers (``_compat._ReceiveBuffersOnDemand``): a micro-batch's input buffer holds
      memory from its receive, posted up to one micro-batch ahead, to its backward; its
      output-gradient buffer from its receive to its backward (two at most: the next one may be
      posted before the backward runs), or with zero bubble to its weight pass, as many as are
      in flight. torch's own buffers, one per micro-batch in each direction for the whole run,
      are emptied.
    - A stage keeps each forward output until its backward (the schedule's ``fwd_cache``); a
      value only the next stage's operators save is not in this stage's activations. With
      ``sends_held`` every output and input gradient it sent lives until the step ends.
    - DDP's buckets: with one micro-batch the gradients are views into them
      (``gradient_as_bucket_view``, ``runtime/pipeline.py``); with more, a second copy of the
      gradients, counted in ``stage_memory``'s backward. Zero bubble's own exchange
      concatenates the gradients after the schedule, when the activations are gone: within the
      optimizer step's temporaries (``stepping``) for the same stage.

    Without checkpointing, the stage's first operators may save the received inputs too, so up
    to ``in_flight`` x ``input_bytes`` count twice: an over-estimate, kept on the safe side.
    """
    inputs = min(num_microbatches, in_flight + 1)
    gradients = min(num_microbatches, in_flight if zero_bubble else 2)
    if sends_held:  # torch's runtime schedules wait on their sends when the step ends
        return inputs * input_bytes + gradients * output_bytes + num_microbatches * (output_bytes + input_bytes)
    return inputs * input_bytes + gradients * output_bytes + in_flight * output_bytes
