"""shardwise.models.pretrained: the model section's load options (dtype, attention kernel) and
gradient checkpointing, as every HF recipe applies them."""

from __future__ import annotations

import pytest
import torch

from shardwise.configfile import ConfigError, from_dict
from shardwise.models.pretrained import PretrainedModelConfig, enable_gradient_checkpointing, is_checkpointing


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
