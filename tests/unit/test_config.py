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
        ({"RANNC_MICRO_BATCHES": "eight"}, r"micro_batches='eight'\): micro_batches must be a positive .* or 'auto'"),
        ({"RANNC_MAX_BLOCKS": "many"}, r"RANNC_MAX_BLOCKS='many' is not a valid int"),
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
    with pytest.raises(ValidationError, match="max_blocks"):
        OmegaConf.merge(schema, OmegaConf.create("max_blocks: many\n"))
    auto = OmegaConf.merge(schema, OmegaConf.create("micro_batches: auto\npipeline_stages: 2\n"))
    assert RaNNCStrategy(**OmegaConf.to_container(auto)).config.micro_batches == "auto"
    many = OmegaConf.merge(schema, OmegaConf.create("micro_batches: many\n"))  # a string, as "auto" is
    with pytest.raises(ValueError, match="micro_batches='many'"):
        RaNNCStrategy(**OmegaConf.to_container(many))


def test_pipeline_stages_read_auto_none_or_a_count_from_the_environment() -> None:
    values = ("auto", "none", "3")
    read = [RaNNCConfig().with_env_overrides({"RANNC_PIPELINE_STAGES": v}).pipeline_stages for v in values]
    assert read == ["auto", None, 3]
    assert RaNNCConfig().pipeline_stages == "auto"
    with pytest.raises(ValueError, match="pipeline_stages='deep'"):
        RaNNCConfig(pipeline_stages="deep")


def test_zero_bubble_with_gpipe_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match=r"zero_bubble=True, schedule='gpipe'\): zero bubble refines 1F1B"):
        RaNNCStrategy(zero_bubble=True, schedule="gpipe")
    with pytest.raises(ValueError, match=r"schedule='zbv', zero_bubble=False.*two stages per rank as zero bubble"):
        RaNNCStrategy(schedule="zbv", zero_bubble=False)
    with pytest.raises(ValueError, match=r"virtual_stages=3\): ZB-V runs two stages per rank"):
        RaNNCStrategy(schedule="zbv", virtual_stages=3)
    RaNNCStrategy(schedule="zbv", virtual_stages=2, zero_bubble=True)  # what it is anyway
