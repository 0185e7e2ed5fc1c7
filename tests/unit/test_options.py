"""Each option is declared once, in ``RaNNCConfig``; everything else that names it derives from
that declaration or is checked against it here."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from lightning_rannc import RaNNCConfig, RaNNCStrategy
from lightning_rannc.__main__ import _parser
from lightning_rannc.config import option_docs, options_table
from lightning_rannc.plan.plan import SCHEDULES
from lightning_rannc.plan.search import SearchSettings

README = Path(__file__).resolve().parents[2] / "README.md"
FIELDS = {f.name: f for f in dataclasses.fields(RaNNCConfig)}
LIGHTNING_ARGUMENTS = ["accelerator", "parallel_devices", "cluster_environment", "checkpoint_io", "precision_plugin"]


def test_the_strategy_signature_is_the_config_plus_lightnings_own_arguments() -> None:
    parameters = dict(inspect.signature(RaNNCStrategy.__init__).parameters)
    parameters.pop("self")
    assert list(parameters) == [*FIELDS, *LIGHTNING_ARGUMENTS]
    for name, field in FIELDS.items():
        assert parameters[name].default == field.default, name
        assert str(parameters[name].annotation) == str(field.type), name


def test_the_strategy_docstring_documents_every_option_from_the_config() -> None:
    doc = RaNNCStrategy.__init__.__doc__ or ""
    for name, meaning in option_docs().items():
        assert f"    {name}: {meaning}." in doc


def test_every_option_reads_back_from_the_strategy() -> None:
    strategy = RaNNCStrategy(micro_batches=8, schedule="gpipe")
    assert all(getattr(strategy, name) == getattr(strategy.config, name) for name in FIELDS)
    with pytest.raises(AttributeError, match="no_such_option"):
        _ = strategy.no_such_option


def test_the_readme_options_table_is_the_configs() -> None:
    assert options_table() in README.read_text()


def test_every_option_can_come_from_the_environment() -> None:
    for name, field in FIELDS.items():
        value = "none" if field.default is None else str(field.default)
        overridden = RaNNCConfig().with_env_overrides({f"RANNC_{name.upper()}": value})
        assert getattr(overridden, name) == field.default, name


def test_the_cli_defaults_and_choices_are_the_configs() -> None:
    plan = _parser()._subparsers._group_actions[0].choices["plan"]  # type: ignore[union-attr]
    actions = {action.dest: action for action in plan._actions}
    for name in ("max_micro_batches", "min_micro_batch_size", "memory_margin", "max_blocks", "schedule"):
        assert actions[name].default == FIELDS[name].default, name
    assert list(actions["schedule"].choices) == ["auto", *SCHEDULES]


def test_the_search_settings_spell_and_default_options_as_the_config_does() -> None:
    settings = {f.name: f for f in dataclasses.fields(SearchSettings)}
    shared = set(settings) & set(FIELDS)
    assert {"pipeline_stages", "micro_batches", "max_micro_batches", "min_micro_batch_size", "schedule"} <= shared
    assert {"activation_checkpointing", "zero_bubble", "memory_margin", "virtual_stages"} <= shared
    for name in shared - {
        "pipeline_stages",
        "micro_batches",
        "activation_checkpointing",
        "virtual_stages",
        "zero_stage",
        "offload_optimizer",
        "zero_bubble",  # the search's None is the config's "auto"
    }:
        assert settings[name].default == FIELDS[name].default, name
