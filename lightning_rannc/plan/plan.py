"""The partition plan: the contract between the planner and the runtime.

A plan is plain data. It can be written to JSON, read back, diffed and edited by hand; the
runtime builds exactly what it says and never re-decides.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning_rannc.errors import PlanError

__all__ = [
    "StagePlan",
    "PartitionPlan",
    "Plan",
    "SCHEDULES",
    "ZERO_STAGES",
    "stage_ranks",
    "stage_position",
    "choose_microbatches",
    "rounds_fit",
]

_FORMAT_VERSION = 1
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zbv")
V_SHAPED = ("zbv",)
"""Schedules whose ranks hold their stages in a V (``stage_position``), not round-robin."""
ZERO_STAGES = (0, 1, 2, 3)
"""Optimizer-state layouts the runtime runs (``PartitionPlan.zero_stage``)."""


@dataclass(kw_only=True)
class StagePlan:
    """One pipeline stage: a node range of the captured graph and the ranks that run it."""

    stage_index: int
    ranks: list[int]
    """Global ranks running this stage, one per data-parallel replica (see ``stage_ranks``)."""
    node_start: int
    """First node of the stage in the captured graph's topological order."""
    node_end: int
    """One past the stage's last node."""
    module_span: str
    """Human-readable module paths the stage covers, e.g. ``"emb, blocks.0-3"``."""
    tensor_names: list[str]
    """Canonical names of the parameters/buffers the stage holds."""
    num_params: int
    fwd_ms: float
    """Profiled forward time of one micro-batch."""
    bwd_ms: float
    """Profiled backward time of one micro-batch."""
    param_bytes: int
    activation_bytes: int
    """Bytes saved for backward per micro-batch."""
    send_bytes: int
    """Bytes sent to the next stage per micro-batch."""
    send_ms: float = 0.0
    """Predicted time to send one micro-batch's activations to the next stage (and its gradients
    back); 0 for the last stage and for plans made without a link model."""
    checkpoint: bool = False
    """Recompute the stage's activations in backward instead of keeping them (per micro-batch)."""
    recompute_end: int | None = None
    """Selective checkpointing: nodes ``node_start .. recompute_end - 1`` (the stage's first
    layers) recompute their activations in backward, the rest keep theirs; ``None``: as
    ``checkpoint`` says, for the whole stage."""
    recompute_span: str = ""
    """The module paths that recompute (the plan table's "ckpt" column)."""
    recompute_cuts: list[int] = field(default_factory=list)
    """Selective checkpointing: the nodes between ``node_start`` and ``recompute_end`` where a
    checkpoint region ends and the next begins (one region per layer: backward recomputes one
    layer at a time)."""
    recompute_ms: float = 0.0
    """The forward time that ``bwd_ms`` includes for recomputation (a zero-bubble backward runs
    it in its input pass)."""
    memory: dict[str, int] = field(default_factory=dict)
    """Predicted bytes per device by kind (params, grads, optimizer, activations, buffers, total);
    empty when the plan was made without a memory model."""


@dataclass(kw_only=True)
class PartitionPlan:
    """Stages, micro-batches and schedule for one captured graph on one set of devices.

    Example::

        plan = PartitionPlan.from_json(Path("plan.json").read_text())
        print(plan.summary())
    """

    graph_fingerprint: str
    """Hash of the captured graph the plan was made for; a different graph rejects the plan."""
    world_size: int
    num_microbatches: int
    microbatch_size: int
    stages: list[StagePlan]
    schedule: str = "gpipe"
    """One of ``SCHEDULES``; ``interleaved_1f1b`` runs ``virtual_stages`` stages per rank, ``zbv``
    two, placed in a V (torch's ``ScheduleZBVZeroBubble``: rank ``r`` of ``S`` runs stages ``r``
    and ``2S - 1 - r``, so the first and the last stage share a rank), always as zero bubble."""
    num_replicas: int = 1
    """Data-parallel replicas of the whole pipeline (D); ``world_size = D * pipeline_stages``."""
    virtual_stages: int = 1
    """Stages per rank (V); stage ``i`` runs on pipeline position ``i % pipeline_stages``, or with
    ``zbv`` in a V (``stage_position``)."""
    zero_bubble: bool = False
    """Run the 1F1B schedule (plain or interleaved) as zero bubble (ZB1P): each backward is split
    into the gradient of the inputs, sent on at once, and that of the weights, run in the bubble.
    Costed as the 1F1B schedule it refines (its peak activation memory is 1F1B's)."""
    zero_stage: int = 1
    """How replicas keep optimizer state: 1 split over them (ZeRO-1: gradients all-reduced, each
    updates its share and broadcasts it), 2 split with the gradients too (ZeRO-2: each replica's
    gradients are reduced to the replica that updates them, the others free theirs), 3 split with
    the parameters too (ZeRO-3: a parameter lives on the replica that updates it, the others
    gather it where a micro-batch uses it and reduce its gradient onto it, ``runtime/zero3.py``),
    0 each keeps all of its stages' (as DDP: no broadcast, more memory)."""
    offload_optimizer: bool = False
    """The optimizer state lives in host memory and the optimizer steps there: each step copies
    the parameters and gradients it updates to the host and the new parameters back."""
    predicted_step_ms: float = 0.0
    """Simulated schedule plus gradient exchange (searched plans), or the bottleneck formula."""
    predicted_bubble: float = 0.0
    """Share of the schedule the busiest stage idles (fill and drain)."""
    predicted_exchange_ms: float = 0.0
    """Data-parallel gradient exchange per step, included in ``predicted_step_ms``."""
    predicted_update_ms: float = 0.0
    """After the exchange: the optimizer step and the training loop's own time per step,
    included in ``predicted_step_ms``."""
    predicted_action_overhead_ms: float = 0.0
    """The runtime's own time per forward or backward of a micro-batch, added to the stages'
    ``fwd_ms`` / ``bwd_ms`` in the simulated schedule (``simulate.simulate_plan``)."""
    no_grad_values: list[str] = field(default_factory=list)
    """Values crossing a cut that carry no gradient to the loss; the runtime detaches them."""
    version: int = _FORMAT_VERSION

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def pipeline_stages(self) -> int:
        """Ranks per pipeline (S): the number of stages divided by the virtual stages per rank."""
        return len(self.stages) // self.virtual_stages

    @property
    def replica_batch_size(self) -> int:
        """Samples each replica runs per step."""
        return self.microbatch_size * self.num_microbatches

    def position_of(self, stage_index: int) -> int:
        """The pipeline position (rank within a replica's pipeline) running stage ``stage_index``."""
        return stage_position(stage_index, self.pipeline_stages, self.schedule)

    def stages_of_rank(self, rank: int) -> list[StagePlan]:
        """The stages a rank runs, in stage order (several with interleaved schedules)."""
        stages = [s for s in self.stages if rank in s.ranks]
        if not stages:
            raise PlanError(f"Rank {rank} has no stage in this plan (ranks: {[s.ranks for s in self.stages]}).")
        return stages

    def microbatches_for(self, batch_size: int) -> int:
        """Micro-batches for a batch of ``batch_size`` samples (see ``choose_microbatches``)."""
        minimum = 1 if self.schedule == "gpipe" else self.pipeline_stages
        # ZB-V takes any count of at least S: torch pads its order for fewer than 2S - 1.
        in_rounds = self.schedule == "interleaved_1f1b" or (self.zero_bubble and self.schedule != "zbv")
        return choose_microbatches(
            batch_size, self.num_microbatches, minimum, self.pipeline_stages if in_rounds else None
        )

    def stage_of_rank(self, rank: int) -> StagePlan:
        """The first stage a rank runs."""
        return self.stages_of_rank(rank)[0]

    def validate(self) -> None:
        """Check the plan's internal consistency; raise ``PlanError`` naming the broken rule."""
        if self.schedule not in SCHEDULES:
            raise PlanError(f"Unknown schedule {self.schedule!r}; valid: {list(SCHEDULES)}.")
        if self.num_microbatches < 1:
            raise PlanError(f"num_microbatches must be >= 1, got {self.num_microbatches}.")
        if self.zero_stage not in ZERO_STAGES:
            raise PlanError(f"zero_stage must be one of {list(ZERO_STAGES)}, got {self.zero_stage}.")
        if self.virtual_stages < 1 or self.num_stages % self.virtual_stages:
            raise PlanError(f"{self.num_stages} stages cannot be run as {self.virtual_stages} virtual stages per rank.")
        if self.zero_bubble and self.zero_stage == 3:
            raise PlanError(
                "zero_stage=3 runs with GPipe and (interleaved) 1F1B, not zero bubble: its weight pass would keep "
                "every gathered parameter from the input pass. Use zero_stage=2, or zero_bubble=False."
            )
        if self.zero_bubble and self.schedule == "gpipe":
            raise PlanError("zero_bubble refines 1F1B schedules, not GPipe: use schedule='1f1b' or 'interleaved_1f1b'.")
        if self.schedule == "zbv" and (self.virtual_stages != 2 or not self.zero_bubble):
            raise PlanError(
                f"schedule='zbv' runs two stages per rank as zero bubble, not virtual_stages={self.virtual_stages} "
                f"with zero_bubble={self.zero_bubble}."
            )
        if (self.virtual_stages > 1) != (self.schedule in ("interleaved_1f1b", "zbv")):
            raise PlanError(f"virtual_stages={self.virtual_stages} needs schedule='interleaved_1f1b' (and back).")
        if self.world_size != self.num_replicas * self.pipeline_stages:
            raise PlanError(
                f"world_size ({self.world_size}) must equal replicas ({self.num_replicas}) x pipeline "
                f"ranks ({self.pipeline_stages})."
            )
        if [s.stage_index for s in self.stages] != list(range(len(self.stages))):
            raise PlanError("Stage indices must be 0, 1, ... in order.")
        for stage in self.stages:
            expected = stage_ranks(stage.stage_index, self.pipeline_stages, self.num_replicas, self.schedule)
            if stage.ranks != expected:
                raise PlanError(f"Stage {stage.stage_index} must run on ranks {expected}, not {stage.ranks}.")
            inside = stage.recompute_end is None or stage.node_start < stage.recompute_end < stage.node_end
            bounds = [stage.node_start, *stage.recompute_cuts, stage.recompute_end or stage.node_start]
            regions = not stage.recompute_cuts or all(a < b for a, b in zip(bounds, bounds[1:]))
            if not inside or not regions or (stage.recompute_end is not None and stage.checkpoint):
                raise PlanError(
                    f"Stage {stage.stage_index} recomputes up to node {stage.recompute_end} in regions from nodes "
                    f"{stage.recompute_cuts}: that must lie inside its nodes ({stage.node_start}-{stage.node_end}), "
                    "the regions in order, and a stage checkpointed whole recomputes all."
                )
        for before, after in zip(self.stages, self.stages[1:]):
            if before.node_end != after.node_start or after.node_start >= after.node_end:
                raise PlanError(
                    f"Stages {before.stage_index} and {after.stage_index} are not contiguous, non-empty "
                    f"node ranges ({before.node_start}-{before.node_end}, {after.node_start}-{after.node_end})."
                )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> PartitionPlan:
        try:
            data: dict[str, Any] = json.loads(text)
            if data.get("version") != _FORMAT_VERSION:
                raise PlanError(f"Plan format version {data.get('version')} is not {_FORMAT_VERSION}; re-plan.")
            stages = [StagePlan(**s) for s in data.pop("stages")]
            plan = cls(stages=stages, **data)
        except (json.JSONDecodeError, TypeError, KeyError) as err:
            raise PlanError(f"Not a valid lightning_rannc plan ({type(err).__name__}: {err}); re-plan.") from err
        plan.validate()
        return plan

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON; atomically (a crash never leaves a half-written plan)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)  # a deployment's folder need not exist yet
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(self.to_json())
        temporary.replace(path)

    def check_matches(self, path: str | Path, **expected: Any) -> None:
        """Refuse a saved plan (a deployment) made for another graph, layout or batch.

        ``expected`` maps field names of the plan (``graph_fingerprint``, ``world_size``, ...) to
        the values of the run that wants to use it.
        """
        stale = {k: (getattr(self, k), v) for k, v in expected.items() if getattr(self, k) != v}
        if stale:
            details = ", ".join(f"{k}: saved {saved!r}, now {now!r}" for k, (saved, now) in stale.items())
            raise PlanError(
                f"The deployment {str(path)!r} was planned for another run ({details}). Delete it to "
                "plan again, or restore the settings it was made for."
            )

    @classmethod
    def load(cls, path: str | Path) -> PartitionPlan:
        return cls.from_json(Path(path).read_text())

    def summary(self) -> list[str]:
        """One line per stage, as logged at setup."""
        schedule = self.schedule + (" (zero bubble)" if self.zero_bubble else "")
        head = (
            f"plan: {self.num_stages} stage(s) x {self.num_replicas} replica(s), {self.num_microbatches} "
            f"micro-batch(es) of {self.microbatch_size}, schedule={schedule}, ZeRO-{self.zero_stage}, "
            + ("optimizer offloaded, " if self.offload_optimizer else "")
            + f"predicted step {self.predicted_step_ms:.2f} ms"
        )
        lines = [head]
        for s in self.stages:
            lines.append(
                f"  stage {s.stage_index} ranks={s.ranks} modules=[{s.module_span}] params={s.num_params:,} "
                f"fwd={s.fwd_ms:.3f}ms bwd={s.bwd_ms:.3f}ms param_mem={_mib(s.param_bytes)} "
                f"act_mem/mb={_mib(s.activation_bytes)} send/mb={_mib(s.send_bytes)}"
                + (f" predicted_mem={_mib(s.memory['total'])}" if s.memory else "")
                + (" checkpointed" if s.checkpoint else "")
                + (f" recomputed=[{s.recompute_span}]" if s.recompute_end is not None else "")
            )
        return lines


Plan = PartitionPlan


def stage_ranks(stage_index: int, pipeline_stages: int, num_replicas: int, schedule: str = "1f1b") -> list[int]:
    """Global ranks of a stage. Ranks ``d*S .. d*S+S-1`` form replica ``d``'s pipeline, so that
    pipeline neighbours are neighbouring ranks (usually on one node); stage ``i`` runs on
    position ``stage_position(i, S, schedule)`` of every pipeline."""
    position = stage_position(stage_index, pipeline_stages, schedule)
    return [d * pipeline_stages + position for d in range(num_replicas)]


def stage_position(stage_index: int, pipeline_stages: int, schedule: str = "1f1b") -> int:
    """The position in its pipeline of the rank running a stage: ``i % S`` (stages dealt to the
    ranks round-robin, as torch's looped schedules expect), or under a V-shaped schedule down the
    ranks and back up (``S = 2``: stages 0, 1, 2, 3 on positions 0, 1, 1, 0), as
    ``ScheduleZBVZeroBubble`` expects."""
    lap, offset = divmod(stage_index, pipeline_stages)
    if schedule in V_SHAPED and lap % 2:
        return pipeline_stages - 1 - offset
    return offset


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.2f}MiB"


def choose_microbatches(batch_size: int, requested: int, minimum: int = 1, rounds_of: int | None = None) -> int:
    """The planned count when it divides the batch, else the divisor of the batch closest to it.

    Micro-batches must all have one shape (the pipeline's buffers are fixed per shape), so a
    batch of 10 with 4 micro-batches planned runs as 5 micro-batches of 2. ``minimum`` is what
    the schedule needs to run (1F1B: one micro-batch per pipeline stage at least); with
    ``rounds_of`` (interleaved and zero-bubble schedules over that many ranks) the count must
    also split into torch's whole rounds (``rounds_fit``).
    """
    candidates = [
        d
        for d in range(max(1, minimum), batch_size + 1)
        if batch_size % d == 0 and (rounds_of is None or rounds_fit(d, rounds_of))
    ]
    if not candidates and rounds_of is not None and batch_size >= minimum:
        raise PlanError(
            f"A batch of {batch_size} sample(s) cannot be split into whole rounds of {rounds_of} micro-batches, "
            "which interleaved and zero-bubble schedules need: use drop_last=True in the DataLoader, or leave "
            "virtual_stages and zero_bubble to 'auto' (the planner then keeps to schedules every batch can take)."
        )
    if not candidates:
        raise PlanError(
            f"A batch of {batch_size} sample(s) cannot be split into the {minimum} micro-batches the "
            "schedule needs at least: use larger batches (drop_last=True) or schedule='gpipe'."
        )
    return min(candidates, key=lambda d: (abs(d - requested), d))


def rounds_fit(microbatches: int, ranks: int) -> bool:
    """Whether torch's interleaved and zero-bubble schedules take this many micro-batches over
    ``ranks`` ranks: they run ``max(1, M // ranks)`` rounds and refuse an M those do not divide."""
    return microbatches % max(1, microbatches // ranks) == 0
