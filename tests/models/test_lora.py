"""shardwise.models.lora: adapters on a tiny random Llama (SmolLM2's architecture), checkpointing,
adapter and merged save/load round trips with transformers / peft alone, QLoRA feature detection."""

from __future__ import annotations

import pytest
import torch

from shardwise.configfile import ConfigError, from_dict
from shardwise.models.lora import (
    LoraConfig,
    apply_lora,
    is_checkpointing,
    parameter_counts,
    qlora_unsupported_reason,
    quantization_kwargs,
    save_adapter,
    save_merged,
    trainable_parameters,
)

peft = pytest.importorskip("peft")


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _train_a_bit(model, steps=3):
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_config_section_is_strict():
    cfg = from_dict(LoraConfig, {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    assert cfg.r == 4 and cfg.alpha == 8.0 and not cfg.load_in_4bit
    with pytest.raises(ConfigError, match="did you mean 'dropout'"):
        from_dict(LoraConfig, {"dropuot": 0.1})
    with pytest.raises(ConfigError, match="r must be >= 1"):
        from_dict(LoraConfig, {"r": 0})


def test_adapters_start_as_the_base_and_train_only_themselves():
    base = _tiny_llama()
    before = _logits(base)
    model = apply_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0))
    torch.testing.assert_close(_logits(model), before)  # B = 0 at the start
    trainable, total = parameter_counts(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    # 2 layers x (q,k,v,o,gate,up,down) x (A + B); r=4 on 32-wide / 64-wide / 16-wide (kv) projections
    assert len(names) == 2 * 7 * 2 and trainable < total / 5


def test_gradient_checkpointing_with_lora_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = apply_lora(_tiny_llama(), LoraConfig(r=4, dropout=0.0), gradient_checkpointing=checkpointing)
        for n, p in model.named_parameters():  # non-zero B so that every adapter gets a gradient
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(n)))
        model.train()
        assert is_checkpointing(model) is checkpointing
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append([p.grad.clone() for p in trainable_parameters(model)])
    assert all(g.abs().sum() > 0 for g in grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_adapter_and_merged_round_trip(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = _tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = apply_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0))
    _train_a_bit(model)
    trained = _logits(model)
    assert not torch.allclose(trained, _logits(_tiny_llama()))

    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(fresh, tmp_path / "adapter")), trained)

    save_merged(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers, no peft
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), trained, rtol=1e-5, atol=1e-5)


def test_unknown_target_modules_name_the_real_ones():
    with pytest.raises(ConfigError, match="target_modules") as e:
        apply_lora(_tiny_llama(), LoraConfig(target_modules=["query", "value"]))
    assert "q_proj" in e.value.hint


def test_qlora_is_feature_detected():
    assert quantization_kwargs(None) == {} and quantization_kwargs(LoraConfig()) == {}
    reason = qlora_unsupported_reason()
    if reason is None:
        kw = quantization_kwargs(LoraConfig(load_in_4bit=True))
        assert kw["quantization_config"].load_in_4bit
    else:
        with pytest.raises(ConfigError, match="load_in_4bit=true: 4-bit QLoRA needs") as e:
            quantization_kwargs(LoraConfig(load_in_4bit=True))
        assert "load_in_4bit=false" in e.value.hint


def test_shardwise_adamw_8bit_trains_only_the_adapters():
    """The optimizer sees the adapters alone (param_groups takes trainable parameters), in 8-bit state."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from shardwise.optim import AdamW
    from shardwise.optim.param_groups import param_groups

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=512, intermediate_size=512, num_hidden_layers=1, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=64,
    )  # fmt: skip
    model = apply_lora(
        LlamaForCausalLM(cfg), LoraConfig(r=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    groups = param_groups(model, weight_decay=0.01)
    assert sum(len(g["params"]) for g in groups) == len(trainable_parameters(model)) == 4
    opt = AdamW(groups, lr=1e-2, state_bits=8)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    state = opt.state[trainable_parameters(model)[0]]  # lora_A of q_proj: 8 x 512 = 4096 elements
    assert state["exp_avg"].dtype == torch.int8 and state["exp_avg_sq"].dtype == torch.uint8  # 8-bit codes
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
