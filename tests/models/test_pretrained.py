"""Which model a recipe loads: the checks that fail at once instead of deep inside transformers."""

from __future__ import annotations

import time

import pytest

from shardwise.errors import ConfigError
from shardwise.models import pretrained
from shardwise.models.pretrained import PretrainedModelConfig, check_config_overrides, check_model_source


def test_local_paths(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        check_model_source(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="holds no config.json"):
        check_model_source(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    check_model_source(str(tmp_path))


def test_hub_id_unreachable_says_offline_at_once(monkeypatch):
    """No network (the hub does not answer a short connect): "offline", without transformers' retries."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(pretrained, "hub_reachable", lambda timeout=3.0: False)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="offline .*is unreachable") as err:
        check_model_source("some-org/some-model-not-cached")
    assert time.perf_counter() - started < 5 and "local folder" in err.value.hint


def test_config_override_typo_has_a_suggestion():
    cfg = PretrainedModelConfig("x", from_scratch=True, model_type="bert", config_overrides={"hiden_size": 8})
    with pytest.raises(ConfigError, match="did you mean 'hidden_size'"):
        check_config_overrides(cfg)
    ok = {"n_embd": 8, "n_positions": 64, "max_position_embeddings": 64}  # attribute_map aliases too
    check_config_overrides(
        PretrainedModelConfig("x", from_scratch=True, model_type="gpt2", config_overrides=ok)
    )
