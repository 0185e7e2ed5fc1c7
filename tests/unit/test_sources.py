"""Weight sources: every format lists its tensors without reading them and reads only the keys asked
for; ``match_keys`` pairs a transformers model's names with a checkpoint's keys."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lightning_rannc.errors import RuntimeSetupError
from lightning_rannc.runtime.sources import TensorSource, match_keys, open_source

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

TIED = "lm_head.weight"  # GPT-2's head shares the token embedding: transformers saves only the latter
CHOSEN = ["transformer.h.1.mlp.c_fc.weight", "transformer.wpe.weight"]


def _config() -> transformers.GPT2Config:
    return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=32)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(_config()).eval()


@pytest.fixture(scope="module")
def state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What transformers writes: the model's tensors less the tied head."""
    assert model.lm_head.weight is model.transformer.wte.weight
    return {name: tensor for name, tensor in model.state_dict().items() if name != TIED}


@pytest.fixture(scope="module")
def saved(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory):
    """Each format -> (what open_source is given, the tensors it must hold)."""
    root = tmp_path_factory.mktemp("weights")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="30KB")
    (root / "bin").mkdir()
    torch.save(state_dict, root / "bin" / "pytorch_model.bin")
    _save_sharded_bin(state_dict, root / "sharded_bin")
    lightning = {f"model.{name}": tensor for name, tensor in state_dict.items()}
    torch.save({"state_dict": lightning, "epoch": 0, "hparams": {"lr": 0.1}}, root / "last.ckpt")
    optimizer = {"state": {0: {"exp_avg": torch.ones(3), "step": 2}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": state_dict, "optimizer_0": optimizer}, checkpoint_id=root / "dcp", no_dist=True)
    return {
        "safetensors directory": (root / "single", state_dict),
        "safetensors file": (str(root / "single" / "model.safetensors"), state_dict),
        "sharded safetensors": (root / "sharded", state_dict),
        "pytorch_model.bin directory": (root / "bin", state_dict),
        "sharded pytorch_model.bin": (root / "sharded_bin", state_dict),
        "Lightning checkpoint": (root / "last.ckpt", lightning),
        "distributed checkpoint": (root / "dcp", state_dict),
        "in-memory state dict": (dict(state_dict, step=3), state_dict),  # the int is skipped
    }


def _save_sharded_bin(state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    folder.mkdir()
    weight_map = {name: f"pytorch_model-0000{i % 3 + 1}-of-00003.bin" for i, name in enumerate(state_dict)}
    for shard in set(weight_map.values()):
        torch.save({name: state_dict[name] for name in state_dict if weight_map[name] == shard}, folder / shard)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in tensors.items()}


FORMATS = [
    "safetensors directory",
    "safetensors file",
    "sharded safetensors",
    "pytorch_model.bin directory",
    "sharded pytorch_model.bin",
    "Lightning checkpoint",
    "distributed checkpoint",
    "in-memory state dict",
]


@pytest.mark.parametrize("form", FORMATS)
def test_every_format_lists_the_models_tensors_and_reads_the_chosen_ones(form: str, saved: dict) -> None:
    given, expected = saved[form]
    source = open_source(given)
    assert source.shapes() == _shapes(expected)
    chosen = [name for name in expected if name.endswith(tuple(CHOSEN))]
    assert len(chosen) == 2
    tensors = source.read(chosen)
    assert list(tensors) == chosen
    for name in chosen:
        assert tensors[name].device.type == "cpu"
        torch.testing.assert_close(tensors[name], expected[name], rtol=0, atol=0)


def test_a_sharded_safetensors_checkpoint_opens_only_the_shards_holding_the_keys_read(
    saved: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = saved["sharded safetensors"][0]
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 3
    opened: list[str] = []
    real_open = safetensors.safe_open

    def recording_open(path: str, *args: object, **kwargs: object) -> object:
        opened.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", recording_open)
    open_source(folder).read(CHOSEN)
    assert sorted(opened) == sorted({weight_map[name] for name in CHOSEN})
    assert len(set(opened)) < len(set(weight_map.values()))


def test_a_sharded_torch_checkpoint_maps_only_the_shards_holding_the_keys_read(
    saved: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = saved["sharded pytorch_model.bin"][0]
    weight_map = json.loads((folder / "pytorch_model.bin.index.json").read_text())["weight_map"]
    loads: list[tuple[str, dict]] = []
    real_load = torch.load

    def recording_load(path: Path, **kwargs: object) -> object:
        loads.append((Path(path).name, kwargs))
        return real_load(path, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    open_source(folder).read(CHOSEN[:1])
    assert [name for name, _ in loads] == [weight_map[CHOSEN[0]]]
    assert loads[0][1] == {"mmap": True, "weights_only": True, "map_location": "cpu"}


def test_a_distributed_checkpoint_reads_only_the_model_keys_asked_for(
    saved: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    requested: list[str] = []
    real_read = dcp.FileSystemReader.read_data

    def recording_read(self: dcp.FileSystemReader, plan: dcp.LoadPlan, planner: object) -> object:
        requested.extend(item.storage_index.fqn for item in plan.items)
        return real_read(self, plan, planner)

    monkeypatch.setattr(dcp.FileSystemReader, "read_data", recording_read)
    open_source(saved["distributed checkpoint"][0]).read(CHOSEN)
    assert sorted(requested) == sorted(f"model.{name}" for name in CHOSEN)


def test_what_cannot_be_opened_or_read_is_refused_with_the_reason(
    saved: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RuntimeSetupError, match=r"looked for model\.safetensors, .*pytorch_model\.bin.*\.metadata"):
        open_source(tmp_path)
    with pytest.raises(RuntimeSetupError, match="no such file or directory"):
        open_source(tmp_path / "absent.pt")
    with pytest.raises(RuntimeSetupError, match=r"has no tensor lm_head\.weight"):
        open_source(saved["safetensors directory"][0]).read([TIED])
    torch.save({"state_dict": {"w": torch.ones(1)}, "where": Path("/tmp")}, tmp_path / "odd.ckpt")
    with pytest.raises(RuntimeSetupError, match="add_safe_globals"):
        open_source(tmp_path / "odd.ckpt")
    torch.save(torch.ones(2), tmp_path / "tensor.pt")
    with pytest.raises(RuntimeSetupError, match="holds a Tensor, not a state dict"):
        open_source(tmp_path / "tensor.pt")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install safetensors"):
        open_source(saved["safetensors directory"][0]).shapes()


def _wanted(module: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return _shapes(module.state_dict())


def _head_aliases(wanted: dict) -> dict[str, str]:
    """GPT-2's tied pair under the canonical name that is NOT in the file, so only the alias can match."""
    return {name: name for name in wanted} | {"transformer.wte.weight": TIED}


def test_a_tied_head_is_found_through_the_embedding_it_shares(model: torch.nn.Module, saved: dict) -> None:
    wanted = _wanted(model)
    source = open_source(saved["safetensors directory"][0])
    found = match_keys(source, wanted, _head_aliases(wanted), where="GPT2LMHeadModel")
    assert found[TIED] == "transformer.wte.weight"
    assert "transformer.wte.weight" not in found and len(found) == len(wanted) - 1
    assert all(found[name] == name for name in found if name != TIED)


def test_the_base_model_prefix_is_added_or_removed_both_ways(model: torch.nn.Module, tmp_path: Path) -> None:
    base = transformers.GPT2Model(_config())
    base.save_pretrained(tmp_path)
    base_source = open_source(tmp_path)
    assert "h.0.attn.c_attn.weight" in base_source.shapes()
    head_wanted = _wanted(model)
    found = match_keys(
        base_source, head_wanted, _head_aliases(head_wanted), where="head", base_model_prefix="transformer"
    )
    assert found["transformer.h.0.attn.c_attn.weight"] == "h.0.attn.c_attn.weight" and found[TIED] == "wte.weight"
    head_source = open_source({f"transformer.{name}": tensor for name, tensor in base.state_dict().items()})
    base_wanted = _wanted(base)
    found = match_keys(
        head_source, base_wanted, {n: n for n in base_wanted}, where="base", base_model_prefix="transformer"
    )
    assert found == {name: f"transformer.{name}" for name in base_wanted}
    with pytest.raises(RuntimeSetupError, match=r"'transformer\.' in front of the module's names"):
        match_keys(head_source, base_wanted, {n: n for n in base_wanted}, where="base")


def test_missing_unexpected_and_misshapen_keys_are_each_named(state_dict: dict[str, torch.Tensor]) -> None:
    wanted = _shapes(state_dict)
    tensors = dict(state_dict, extra=torch.zeros(1), **{"transformer.wpe.weight": torch.zeros(4, 4)})
    del tensors["transformer.ln_f.bias"]
    with pytest.raises(RuntimeSetupError) as raised:
        match_keys(open_source(tensors), wanted, {n: n for n in wanted}, where="GPT2 at `model` of MyLM")
    message = str(raised.value)
    assert "into GPT2 at `model` of MyLM" in message and "the state dict passed in memory" in message
    assert "missing from the source (1): transformer.ln_f.bias" in message
    assert "in the source but not in the module (1): extra" in message
    assert "transformer.wpe.weight (32, 32) vs transformer.wpe.weight (4, 4)" in message
    assert "strict=False" in message


def test_long_lists_are_cut_to_ten_with_a_count(state_dict: dict[str, torch.Tensor]) -> None:
    wanted = _shapes(state_dict)
    source = open_source({"transformer.wte.weight": state_dict["transformer.wte.weight"]})
    with pytest.raises(RuntimeSetupError, match=rf"missing from the source \({len(wanted) - 1}\): .* and 17 more"):
        match_keys(source, wanted, {n: n for n in wanted}, where="GPT2")


def test_not_strict_leaves_out_missing_names_but_still_refuses_a_wrong_shape(
    state_dict: dict[str, torch.Tensor],
) -> None:
    wanted = _shapes(state_dict)
    aliases = {n: n for n in wanted}
    tensors = {name: tensor.half() for name, tensor in state_dict.items() if "h.1." not in name}  # dtype may differ
    found = match_keys(open_source(dict(tensors, extra=torch.zeros(1))), wanted, aliases, where="GPT2", strict=False)
    assert set(found) == {name for name in wanted if "h.1." not in name}
    tensors["transformer.ln_f.weight"] = torch.zeros(3)
    with pytest.raises(RuntimeSetupError, match=r"wrong shape .*transformer\.ln_f\.weight \(32,\) vs"):
        match_keys(open_source(tensors), wanted, aliases, where="GPT2", strict=False)


def test_a_source_is_a_tensor_source(saved: dict) -> None:
    source = open_source(saved["distributed checkpoint"][0])
    assert isinstance(source, TensorSource) and "the distributed checkpoint" in source.description
    assert not any(name.startswith("optimizer_") for name in source.shapes())
