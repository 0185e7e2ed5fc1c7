"""Choosing stages x replicas from a sample batch (what the strategy does at setup), and the
profile cache that lets the first batch reuse the costs measured for that choice."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, TensorDataset

from lightning_rannc import PlanError, RaNNCConfig
from lightning_rannc.capture.batch import FlatBatch
from lightning_rannc.capture.graph import group_nodes
from lightning_rannc.integration.layout import epoch_samples
from lightning_rannc.plan.cost_model import BlockCost
from lightning_rannc.profile.cache import ProfileCache, profile_key
from lightning_rannc.runtime.captures import capture_micro
from lightning_rannc.runtime.planning import EngineOptions, choose_layout

from helpers.models import GPT, SyntheticTokens

_CPU = torch.device("cpu")


def _gpt_and_batch() -> tuple[GPT, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = GPT(layers=4, dim=32, seq_len=16)
    batch = next(iter(DataLoader(SyntheticTokens(8, seq_len=16, vocab_size=256), batch_size=8)))
    return model, batch


def _options(memory_limit: int | None = None, **config: object) -> EngineOptions:
    options: dict = {"micro_batches": "auto", "profile_repeats": 1, **config}
    return EngineOptions(config=RaNNCConfig(**options), pipeline_stages=1, memory_limit=memory_limit)


def test_a_tighter_memory_limit_makes_the_chosen_pipeline_deeper_and_it_fits() -> None:
    model, batch = _gpt_and_batch()
    roomy = choose_layout(model, batch, _options(), 4, _CPU, ProfileCache())
    assert roomy.plan is not None and roomy.pipeline_stages * roomy.num_replicas == 4
    # The whole model's parameters, gradients and (at best, a quarter of its) Adam state take 2.5x
    # its parameter bytes: with 2.2x (less the margin), no micro-batching or checkpointing fits it.
    assert roomy.pipeline_stages == 1
    limit = int(2.2 * roomy.plan.stages[0].memory["params"])
    options = _options(memory_limit=limit, activation_checkpointing="auto")
    tight = choose_layout(model, batch, options, 4, _CPU, ProfileCache())
    assert tight.plan is not None and tight.pipeline_stages > roomy.pipeline_stages
    assert all(s.memory["total"] <= 0.9 * limit for s in tight.plan.stages)
    assert f"{tight.pipeline_stages} stage(s) x {tight.num_replicas} replica(s)" in tight.summary


def test_the_second_choice_reads_the_profile_cache_instead_of_profiling(monkeypatch: pytest.MonkeyPatch) -> None:
    model, batch = _gpt_and_batch()
    cache = ProfileCache()
    first = choose_layout(model, batch, _options(), 2, _CPU, cache)

    def no_profiling(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached costs must be used")

    monkeypatch.setattr("lightning_rannc.runtime.planning.profile_blocks", no_profiling)
    again = choose_layout(model, batch, _options(), 2, _CPU, cache)
    assert (again.pipeline_stages, again.num_replicas) == (first.pipeline_stages, first.num_replicas)
    assert again.plan is not None and first.plan is not None
    assert again.plan.predicted_step_ms == first.plan.predicted_step_ms


def test_layout_comes_from_an_existing_deployment_and_must_match_the_device_count(tmp_path: Path) -> None:
    model, batch = _gpt_and_batch()
    chosen = choose_layout(model, batch, _options(memory_limit=10**6), 4, _CPU, ProfileCache())
    assert chosen.plan is not None
    path = tmp_path / "plan.json"
    chosen.plan.save(path)
    deployed = choose_layout(model, batch, _options(deployment=str(path)), 4, _CPU, ProfileCache())
    assert (deployed.pipeline_stages, deployed.num_replicas) == (chosen.pipeline_stages, chosen.num_replicas)
    with pytest.raises(PlanError, match="planned for 4 device"):
        choose_layout(model, batch, _options(deployment=str(path)), 2, _CPU, ProfileCache())


def _costs(count: int) -> list[BlockCost]:
    return [
        BlockCost(
            start=k,
            end=k + 1,
            fwd_ms=0.5 + k,
            bwd_ms=1.0 + k,
            activation_bytes=100 * k,
            cut_bytes=10,
            tensor_names=(f"w{k}",),
            module_paths=(f"layers.{k}",),
        )
        for k in range(count)
    ]


def test_profiles_survive_on_disk_and_a_damaged_file_is_profiled_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ProfileCache(tmp_path).store("abc", _costs(3))
    assert ProfileCache(tmp_path).load("abc") == _costs(3)  # a new process reads the file
    assert ProfileCache(tmp_path).load("other") is None
    (tmp_path / "abc.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="lightning_rannc"):
        assert ProfileCache(tmp_path).load("abc") is None
    assert "unreadable profile" in caplog.text
    assert ProfileCache().load("abc") is None  # without a directory nothing is shared


def test_profile_key_changes_with_shapes_device_method_and_blocks() -> None:
    model, batch = _gpt_and_batch()
    _, graph = capture_micro(model, FlatBatch.of(batch, "test"), 4)
    spans = group_nodes(graph, 8)
    tokens = next(iter(batch.values()))
    leaves = [tokens[:2]]
    key = profile_key(graph.fingerprint(), leaves, spans, "cpu", "measured")
    assert key == profile_key(graph.fingerprint(), [tokens[2:4]], spans, "cpu", "measured")  # values do not matter
    others = [
        profile_key(graph.fingerprint(), [tokens[:4]], spans, "cpu", "measured"),
        profile_key(graph.fingerprint(), leaves, spans, "NVIDIA H100", "measured"),
        profile_key(graph.fingerprint(), leaves, spans, "cpu", "analytic:cpu"),
        profile_key(graph.fingerprint(), leaves, group_nodes(graph, 4), "cpu", "measured"),
        profile_key("another graph", leaves, spans, "cpu", "measured"),
        # the same graph with wider parameters: the fingerprint alone does not tell them apart
        profile_key(graph.fingerprint(), leaves, spans, "cpu", "measured", {"w": torch.zeros(4, 4)}),
    ]
    assert profile_key(graph.fingerprint(), leaves, spans, "cpu", "measured", {"w": torch.zeros(8, 4)}) not in others
    assert key not in others and len(set(others)) == len(others)


def test_searched_micro_batch_counts_respect_the_bounds() -> None:
    model, batch = _gpt_and_batch()
    cache = ProfileCache()
    # a deep pipeline wants many micro-batches to fill it
    deep = choose_layout(model, batch, _options(memory_limit=10**6, activation_checkpointing="auto"), 4, _CPU, cache)
    assert deep.plan is not None and deep.plan.num_microbatches > 2
    for bounds in ({"max_micro_batches": 2}, {"min_micro_batch_size": 4}):
        options = _options(memory_limit=10**6, activation_checkpointing="auto", **bounds)
        bounded = choose_layout(model, batch, options, 4, _CPU, cache)
        assert bounded.plan is not None and bounded.plan.num_microbatches <= 2


def test_planning_reports_each_phase_with_its_time(caplog: pytest.LogCaptureFixture) -> None:
    model, batch = _gpt_and_batch()
    with caplog.at_level(logging.INFO, logger="lightning_rannc"):
        choose_layout(model, batch, _options(), 2, _CPU, ProfileCache())
    lines = [r.message for r in caplog.records]
    for start in ("captured the step in ", "profiled ", "searched "):
        line = next(x for x in lines if x.startswith(start))
        assert float(line.split(" in ")[1].split(" s")[0]) >= 0


def test_a_batch_the_requested_micro_batch_count_does_not_divide_still_gets_a_layout() -> None:
    model, batch = _gpt_and_batch()
    six = {key: value[:6] for key, value in batch.items()}  # 4 micro-batches do not divide 6
    layout = choose_layout(model, six, _options(micro_batches=4), 2, _CPU, ProfileCache())
    assert layout.plan is not None and layout.plan.num_microbatches == 3  # the nearest divisor, as the engine runs


@pytest.mark.parametrize(("samples", "batch", "replicas"), [(83, 8, 2), (80, 8, 2), (83, 8, 1), (85, 4, 3)])
def test_epoch_samples_give_the_last_batch_each_replica_gets(samples: int, batch: int, replicas: int) -> None:
    """The search reads each replica's last batch as ``ceil(E / D) % B`` (``SearchSettings.epoch_samples``):
    from the user's loader at setup (D = 1 there) and from the loader Lightning made at the first batch."""
    data = TensorDataset(torch.arange(samples))
    user = DataLoader(data, batch_size=batch)
    dealt = DataLoader(data, batch_size=batch, sampler=DistributedSampler(data, replicas, rank=0, shuffle=False))
    sizes = [len(b[0]) for b in (dealt if replicas > 1 else user)]
    for loader, dealt_over in ((user, 1), (dealt if replicas > 1 else user, replicas)):
        epoch = epoch_samples(loader, dealt_over)
        assert epoch is not None
        assert -(-epoch // replicas) % batch == (sizes[-1] if sizes[-1] < batch else 0)
    assert epoch_samples(DataLoader(data, batch_size=batch, drop_last=True), replicas) == 0

    class Stream(IterableDataset):  # type: ignore[type-arg]
        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(range(samples))

    assert epoch_samples(DataLoader(Stream(), batch_size=batch), replicas) is None  # no length
    assert epoch_samples(DataLoader(data, batch_sampler=[[0, 1], [2]]), replicas) is None  # the user's batches
    assert epoch_samples([user, user], replicas) is None  # several loaders
