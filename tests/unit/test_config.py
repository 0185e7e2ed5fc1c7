import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from lightning_rannc import RaNNCConfig, RaNNCStrategy


def test_environment_variables_override_arguments_with_their_types() -> None:
    env = {
        "RANNC_MICRO_BATCHES": "8",
        "RANNC_ACTIVATION_CHECKPOINTING": "yes",
        "RANNC_PIPELINE_STAGES": "none",
        "RANNC_TIMEOUT": "90.5",
        "HOME": "/root",
    }
    config = RaNNCConfig(micro_batches=2, pipeline_stages=4).with_env_overrides(env)
    assert (config.micro_batches, config.activation_checkpointing, config.pipeline_stages) == (8, True, None)
    assert config.timeout == 90.5 and config.schedule == "auto"


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"RANNC_MICRO_BATCHES": "eight"}, r"RANNC_MICRO_BATCHES='eight' is not a valid int"),
        ({"RANNC_MICRO_BATCHES": "0"}, r"micro_batches=0\): micro_batches must be a positive integer"),
        ({"RANNC_SCHEDULE": "zb"}, r"schedule='zb'\): valid values are \['auto', 'gpipe'"),
        ({"RANNC_MEM_LIMIT_GB": "40"}, r"Unknown lightning_rannc environment variable\(s\) \['RANNC_MEM_LIMIT_GB'\]"),
    ],
)
def test_bad_environment_values_name_the_variable_and_the_valid_values(env: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RaNNCConfig().with_env_overrides(env)


def test_strategy_takes_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANNC_MICRO_BATCHES", "6")
    strategy = RaNNCStrategy(micro_batches=2)
    assert strategy.micro_batches == 6 and strategy.config.micro_batches == 6


def test_yaml_values_are_type_checked_by_omegaconf_and_build_the_strategy() -> None:
    schema = OmegaConf.structured(RaNNCConfig)
    config = OmegaConf.merge(schema, OmegaConf.create("micro_batches: 8\nschedule: gpipe\n"))
    strategy = RaNNCStrategy(**OmegaConf.to_container(config))
    assert (strategy.micro_batches, strategy.schedule) == (8, "gpipe")
    with pytest.raises(ValidationError, match="micro_batches"):
        OmegaConf.merge(schema, OmegaConf.create("micro_batches: many\n"))
