"""``load_pretrained`` and the initialisation of tensors a rank materialises from the meta device."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers

from lightning_rannc import RuntimeSetupError, load_pretrained
from lightning_rannc.capture.module_state import canonical_names
from lightning_rannc.runtime.initialize import initialize_tensors
from lightning_rannc.runtime.state import install_tensors
from lightning_rannc.runtime.weights import apply_pending_loads

from helpers.hf_models import make_config, model_class, save_pretrained


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_pretrained("gpt2", tmp_path_factory.mktemp("gpt2") / "gpt2")


def _meta_gpt2() -> torch.nn.Module:
    with torch.device("meta"):
        return transformers.GPT2LMHeadModel(make_config("gpt2"))


def _materialise(model: torch.nn.Module, names: set[str], seed: int = 7) -> dict[str, torch.Tensor]:
    """What the engine does on a rank: allocate ``names``, initialise them, apply pending loads."""
    _, aliases, tensors = canonical_names(model)
    empty = {n: torch.empty(tensors[n].shape, dtype=tensors[n].dtype) for n in names}
    install_tensors(model, aliases, empty, torch.device("cpu"))
    initialize_tensors(model, aliases, sorted(names), seed, torch.device("cpu"))
    current = canonical_names(model)[2]
    apply_pending_loads(model, aliases, {n: current[n] for n in names})
    return {n: t.detach().clone() for n, t in canonical_names(model)[2].items() if n in names}


def test_a_whole_module_loads_at_once_what_transformers_from_pretrained_loads(gpt2_dir: Path) -> None:
    ours = load_pretrained(transformers.GPT2LMHeadModel(make_config("gpt2")), gpt2_dir)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_a_meta_module_reads_only_the_tensors_a_rank_materialises(gpt2_dir: Path) -> None:
    model = load_pretrained(_meta_gpt2(), gpt2_dir)
    assert all(t.is_meta for t in model.state_dict().values())  # nothing read yet
    stage = {"transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.bias", "transformer.ln_f.weight"}
    values = _materialise(model, stage)
    reference = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).state_dict()
    for name in stage:
        torch.testing.assert_close(values[name], reference[name], rtol=0, atol=0)
    others = {k for k, t in model.state_dict().items() if not t.is_meta} - stage
    assert others == set()


@pytest.mark.parametrize(
    ("kind", "change", "named"),
    [
        ("bert", {}, r"missing.*transformer\.h\.0\.attn\.c_attn\.weight.*not in the module.*bert\.embeddings"),
        (
            "gpt2",
            {"n_embd": 48},
            r"wrong shape.*transformer\.wte\.weight \(128, 32\) vs transformer\.wte\.weight \(128, 48\)",
        ),
    ],
)
def test_a_wrong_source_is_refused_when_noted_naming_the_keys(
    tmp_path: Path, kind: str, change: dict, named: str
) -> None:
    config = make_config(kind)
    for key, value in change.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model_class(kind)(config).save_pretrained(tmp_path / kind)
    with pytest.raises(RuntimeSetupError, match=f"(?s)GPT2LMHeadModel.*{named}"):
        load_pretrained(_meta_gpt2(), tmp_path / kind)


def test_transformers_initialisation_does_not_depend_on_which_tensors_a_rank_holds() -> None:
    everything = set(canonical_names(_meta_gpt2())[2])
    whole = _materialise(_meta_gpt2(), everything)
    part = {"transformer.h.1.attn.c_proj.weight", "transformer.h.0.mlp.c_fc.weight", "transformer.wpe.weight"}
    alone = _materialise(_meta_gpt2(), part)
    for name in part:
        torch.testing.assert_close(alone[name], whole[name], rtol=0, atol=0, msg=name)
    # transformers' own scheme (GPT2PreTrainedModel._init_weights), not reset_parameters: the
    # residual projections are scaled by 1/sqrt(2 x layers), the other weights have std 0.02
    config = make_config("gpt2")
    scaled = config.initializer_range / math.sqrt(2 * config.n_layer)
    assert float(whole["transformer.h.1.attn.c_proj.weight"].std()) == pytest.approx(scaled, rel=0.15)
    assert float(whole["transformer.h.1.attn.c_attn.weight"].std()) == pytest.approx(0.02, rel=0.15)
    assert torch.equal(whole["transformer.h.0.ln_1.weight"], torch.ones(config.n_embd))
    assert (
        _materialise(_meta_gpt2(), everything, seed=8)["transformer.wte.weight"]
        .ne(whole["transformer.wte.weight"])
        .any()
    )
