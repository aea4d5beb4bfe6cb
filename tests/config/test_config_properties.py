"""Property: the config loader, given any YAML (random structures near the real schema, or random
text), returns a valid config or raises ConfigError — never another exception type."""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardwise.configfile import ConfigError, load_config
from shardwise.data.text import ClassificationDataConfig
from shardwise.models.pretrained import PretrainedModelConfig
from shardwise.train.sections import OptimizerConfig, TrainConfig


@dataclass
class RecipeConfig:  # the shape of recipes/finetune_bert.py's Config
    data: ClassificationDataConfig = field(default_factory=ClassificationDataConfig)
    model: PretrainedModelConfig = field(default_factory=lambda: PretrainedModelConfig("m"))
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = {
    "data": ["dataset", "data_files", "max_length", "max_train_samples", "label_column", "train_split"],
    "model": ["name_or_path", "from_scratch", "model_type", "config_overrides"],
    "optimizer": ["lr", "betas", "eps", "state_bits", "variant", "warmup_steps", "warmup_ratio", "shard"],
    "train": ["batch_size", "epochs", "max_steps", "max_grad_norm", "report_to", "keep_last", "overwrite"],
}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["1e-3", "nan", "-inf", "adam", "32", "8", "auto", "[1, 2]"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def near_schema(draw):
    """Mostly real section / key names (with typos), random values."""
    cfg = {}
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "trian", "misc"]), max_size=4, unique=True)):
        keys = SECTIONS.get(section, ["x"])
        names = st.sampled_from(keys) | st.sampled_from(keys).map(lambda k: k[:-1]) | st.text(max_size=5)
        as_mapping = draw(st.booleans())
        cfg[section] = draw(st.dictionaries(names, values, max_size=4)) if as_mapping else draw(values)
    return cfg


def _check(tmp_path, text: str, overrides=()):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    try:
        cfg = load_config(RecipeConfig, path, list(overrides))
    except ConfigError:
        return
    assert isinstance(cfg, RecipeConfig)


SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(near_schema(), st.lists(st.text(max_size=12), max_size=2))
def test_random_structures_load_or_config_error(tmp_path, data, overrides):
    _check(tmp_path, yaml.safe_dump(data, allow_unicode=True), overrides)


@SETTINGS
@given(st.text(max_size=80))
def test_random_text_loads_or_config_error(tmp_path, text):
    _check(tmp_path, text)


def test_recursive_alias_is_a_config_error(tmp_path):
    _check(tmp_path, "train: &a\n  report_to: [*a]\n")
