"""Which model a recipe loads and how: the checks that fail at once instead of deep inside transformers,
the load options (dtype, attention kernel) and gradient checkpointing, as every HF recipe applies them."""

from __future__ import annotations

import time

import pytest
import torch

from shardwise.configfile import from_dict
from shardwise.errors import ConfigError
from shardwise.models import pretrained
from shardwise.models.pretrained import (
    PretrainedModelConfig,
    check_config_overrides,
    check_model_source,
    enable_gradient_checkpointing,
    is_checkpointing,
)


def test_local_paths(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        check_model_source(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="holds no config.json"):
        check_model_source(str(tmp_path))
    with pytest.raises(ConfigError, match="holds no config.json or tokenizer_config.json"):
        check_model_source(str(tmp_path), "model.tokenizer")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    check_model_source(str(tmp_path), "model.tokenizer")  # a tokenizer-only folder: fine for a tokenizer
    with pytest.raises(ConfigError, match="holds no config.json"):
        check_model_source(str(tmp_path))  # ... but not a model
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


def test_load_kwargs_dtype_and_attention():
    assert PretrainedModelConfig("m").load_kwargs() == {"dtype": torch.float32}
    cfg = from_dict(
        PretrainedModelConfig, {"name_or_path": "m", "dtype": "bfloat16", "attn_implementation": "sdpa"}
    )
    assert cfg.load_kwargs() == {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
    assert PretrainedModelConfig("m", dtype="auto").load_kwargs() == {"dtype": "auto"}
    with pytest.raises(ConfigError, match="dtype"):
        from_dict(PretrainedModelConfig, {"name_or_path": "m", "dtype": "bf16"})
    with pytest.raises(ConfigError, match="attn_implementation"):
        from_dict(PretrainedModelConfig, {"name_or_path": "m", "attn_implementation": "flash"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_flash_attention_needs_cuda():
    with pytest.raises(ConfigError, match="CUDA") as e:
        PretrainedModelConfig("m", attn_implementation="flash_attention_2").load_kwargs()
    assert "sdpa" in e.value.hint


def test_bf16_weights_and_checkpointing_on_a_tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = PretrainedModelConfig("m", dtype="bfloat16", attn_implementation="eager")
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    model = AutoModelForCausalLM.from_config(config, **cfg.load_kwargs())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    enable_gradient_checkpointing(model)
    assert is_checkpointing(model) and model.config.use_cache is False
    model.train()
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
