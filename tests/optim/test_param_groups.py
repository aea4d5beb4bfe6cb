"""Decay / no-decay groups on real transformers architectures built from config."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from shardwise.optim import param_groups


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_gpt2_layernorms_and_biases_are_not_decayed():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    undecayed = _names(model, no_decay)
    assert {
        "transformer.ln_f.weight",
        "transformer.h.0.ln_1.weight",
        "transformer.h.1.ln_2.bias",
    } <= undecayed
    assert "transformer.h.0.attn.c_attn.weight" in _names(model, decay)
    # Tied embeddings / lm_head count once.
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique


def test_llama_rmsnorm_is_not_decayed():
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=100)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    _, no_decay = param_groups(model, 0.1)
    assert {"model.norm.weight", "model.layers.0.input_layernorm.weight"} <= _names(model, no_decay)


def test_bert_every_1d_param_undecayed():
    model = BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    )
    decay, no_decay = param_groups(model, 0.01)
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim <= 1 for p in no_decay["params"])


def test_no_weight_decay_hook_and_frozen_params():
    class WithPos(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, 4, 8))
            self.proj = torch.nn.Linear(8, 8)
            self.frozen = torch.nn.Linear(8, 8)
            self.frozen.requires_grad_(False)

        def no_weight_decay(self):
            return {"pos_embed"}

    model = WithPos()
    groups = param_groups(model, 0.05)
    assert _names(model, groups[0]) == {"proj.weight"}
    assert _names(model, groups[1]) == {"pos_embed", "proj.bias"}


def test_empty_groups_dropped():
    groups = param_groups(torch.nn.LayerNorm(4), 0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0


def test_deepspeed_zero3_placeholders_sorted_by_ds_shape():
    """Under ZeRO-3's zero.Init every parameter is an empty 1-D placeholder; DeepSpeed keeps the
    real shape in ``ds_shape``: the groups must be the ones the real shapes give."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    expected = [[_names(model, g)] for g in param_groups(model, 0.1)]
    for p in model.parameters():
        p.ds_shape = p.shape
        p.data = torch.empty(0)  # what zero.Init leaves on every rank
    got = param_groups(model, 0.1)
    assert [[_names(model, g)] for g in got] == expected
    assert _names(model, got[0]) == {"0.weight", "2.weight"}
