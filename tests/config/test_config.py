"""shardwise.config: strict loading, overrides, errors that name the key and the fix."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
import yaml

from shardwise.configfile import ConfigError, from_dict, load_config, parse_args, save_config, to_dict
from shardwise.train.sections import OptimizerConfig, TrainConfig


@dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    mode: Literal["a", "bb"] = "a"
    bits: Literal[32, 8] = 32
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outer:
    name: str
    steps: int = 10
    tags: list[str] = field(default_factory=list)
    warmup: int | None = None
    inner: Inner = field(default_factory=Inner)
    maybe: Inner | None = None


def test_defaults_nested_and_types():
    cfg = from_dict(Outer, {"name": "x", "inner": {"betas": [0.8, 0.9], "lr": "1e-3", "bits": 8}})
    assert cfg.inner.betas == (0.8, 0.9) and isinstance(cfg.inner.betas, tuple)
    assert cfg.inner.lr == 1e-3 and cfg.inner.bits == 8 and cfg.warmup is None
    assert from_dict(Outer, {"name": "x", "maybe": {"mode": "bb"}}).maybe.mode == "bb"


def test_unknown_key_names_path_and_closest():
    with pytest.raises(ConfigError, match=r"inner\.lrr.*did you mean 'lr'"):
        from_dict(Outer, {"name": "x", "inner": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match=r"'stpes'.*did you mean 'steps'"):
        from_dict(Outer, {"name": "x", "stpes": 1})


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"name": "x", "steps": "ten"}, r"steps: expected int, got 'ten'"),
        ({"name": "x", "steps": True}, r"steps: expected int"),
        ({"name": "x", "steps": 1.5}, r"steps: expected int"),
        ({"name": 3}, r"name: expected str"),
        ({"name": "x", "inner": {"betas": [0.9]}}, r"inner\.betas: expected tuple\[float, float\]"),
        ({"name": "x", "inner": {"mode": "b"}}, r"inner\.mode: expected one of 'a', 'bb'.*did you mean 'bb'"),
        ({"name": "x", "inner": {"bits": 16}}, r"inner\.bits: expected one of 32, 8"),
        ({"name": "x", "tags": ["a", 1]}, r"tags\[1\]: expected str"),
        ({"name": "x", "inner": 3}, r"inner: expected a mapping"),
        ({"steps": 3}, r"missing required config key 'name'"),
    ],
)
def test_type_errors(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict(Outer, data)


def test_overrides_yaml_and_save_roundtrip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ninner:\n  lr: 0.1\n")
    cfg = load_config(
        Outer, p, ["inner.lr=3e-4", "inner.betas=[0.5, 0.6]", "warmup=null", "maybe.mode=bb", "tags=[a]"]
    )
    assert cfg.inner.lr == 3e-4 and cfg.inner.betas == (0.5, 0.6) and cfg.maybe.mode == "bb"
    out = save_config(cfg, tmp_path / "out" / "resolved.yaml")
    assert load_config(Outer, out) == cfg
    assert yaml.safe_load(out.read_text()) == to_dict(cfg)
    with pytest.raises(ConfigError, match=r"inner\.lrx.*did you mean 'lr'"):
        load_config(Outer, p, ["inner.lrx=1"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(Outer, p, ["inner.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_parse_args_exits_with_message(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\n")
    assert parse_args(Outer, ["--config", str(p), "steps=3"]).steps == 3
    with pytest.raises(SystemExit):
        parse_args(Outer, ["--config", str(p), "setps=3"])
    assert "did you mean 'steps'" in capsys.readouterr().err


def test_shared_sections_validate():
    assert from_dict(OptimizerConfig, {"state_bits": 8, "shard": True}).overrides()["state_bits"] == 8
    with pytest.raises(ConfigError, match="warmup_ratio"):
        from_dict(OptimizerConfig, {"warmup_ratio": 1.5})
    with pytest.raises(ConfigError, match="grad_accum_steps must be >= 1"):
        from_dict(TrainConfig, {"grad_accum_steps": 0})
