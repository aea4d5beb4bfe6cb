"""shardwise.data.chat: assistant-only masking (token by token, real SmolLM2 tokenizer), validation,
packing (same per-token losses as one by one), and the token-count loss under gradient accumulation."""

from __future__ import annotations

import json

import pytest
import torch

from shardwise.data.assets import assets_dir, chitchat_to_messages
from shardwise.data.chat import (
    IGNORE_INDEX,
    ChatDataConfig,
    PackedChatCollator,
    PaddedChatCollator,
    block_causal_mask,
    load_chat,
    pack,
    pack_bins,
    packed_attention_path,
    tokenize_conversation,
)
from shardwise.errors import DataError
from shardwise.train.losses import batch_token_loss, count_target_tokens, step_loss, token_loss

SMOLLM = assets_dir() / "models" / "SmolLM2-135M-Instruct"

CHAT = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you"},
]


@pytest.fixture(scope="module")
def tok():
    if not (SMOLLM / "tokenizer.json").is_file():
        pytest.skip(f"SmolLM2 asset not in the cache ({SMOLLM}); run `make assets`")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SMOLLM))


def test_chitchat_conversion_merges_senders_and_ends_with_the_assistant():
    u = lambda text, s: {"text": text, "sender": s, "timestamp": "t"}
    chat = {
        "messages": [
            [u("hi", "a"), u("you there?", "a")],
            [u("yes", "b")],
            [u(" ", "b"), u("hm", "b")],
            [u("bye", "a")],
        ]
    }
    assert chitchat_to_messages(chat) == [
        {"role": "user", "content": "hi\nyou there?"},
        {"role": "assistant", "content": "yes\nhm"},  # same sender across groups: one message
    ]  # the trailing user turn is dropped (no reply to learn from)
    assert chitchat_to_messages({"messages": [[u("anyone?", "a")]]}) == []  # nobody answered


def test_masking_token_by_token_on_smollm2(tok):
    enc = tokenize_conversation(tok, CHAT)
    # the same tokens as the template's own tokenization
    assert enc["input_ids"] == list(
        tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    )
    pieces = [(tok.decode([i]), lab != IGNORE_INDEX) for i, lab in zip(enc["input_ids"], enc["labels"])]
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    n_system = len(tok(system, add_special_tokens=False)["input_ids"])
    head = pieces[: 3 + n_system + 2]  # <|im_start|> system \n ... <|im_end|> \n
    assert [p for p, _ in head[:3]] == ["<|im_start|>", "system", "\n"] and not any(t for _, t in head)
    # hand-checked: targets are exactly the assistant contents plus their <|im_end|>, nothing else
    assert pieces[len(head) :] == [
        ("<|im_start|>", False), ("user", False), ("\n", False), ("Hi", False), (" there", False),
        ("<|im_end|>", False), ("\n", False),
        ("<|im_start|>", False), ("ass", False), ("istant", False), ("\n", False),
        ("Hello", True), ("!", True), ("<|im_end|>", True), ("\n", False),
        ("<|im_start|>", False), ("user", False), ("\n", False), ("By", False), ("e", False),
        ("<|im_end|>", False), ("\n", False),
        ("<|im_start|>", False), ("ass", False), ("istant", False), ("\n", False),
        ("See", True), (" you", True), ("<|im_end|>", True), ("\n", False),
    ]  # fmt: skip
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(enc["input_ids"], enc["labels"]))


def _files(tmp_path, train_rows, eval_rows=None):
    out = {}
    for split, rows in (("train", train_rows), ("validation", eval_rows or train_rows)):
        path = tmp_path / f"{split}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        out[split] = str(path)
    return out


def _long_chat(n):
    return [{"role": ("user", "assistant")[i % 2], "content": f"turn {i} " + "word " * 20} for i in range(n)]


def test_load_chat_from_local_jsonl(tmp_path, tok):
    rows = [{"messages": CHAT}, {"messages": CHAT[:2]}, {"messages": _long_chat(6)}]
    cfg = ChatDataConfig(data_files=_files(tmp_path, rows), max_length=256)
    train, evals = load_chat(cfg, tok)
    assert len(train) == 3 and len(evals) == 3 and train.column_names == ["input_ids", "labels"]
    assert train[0] == tokenize_conversation(tok, CHAT)
    packed, _ = load_chat(ChatDataConfig(data_files=cfg.data_files, max_length=256, packing=True), tok)
    assert sum(len(r) for r in packed["input_ids"]) == sum(len(r) for r in train["input_ids"])
    assert len(packed) < len(train) and all(len(r) <= 256 for r in packed["input_ids"])


def test_overlong_conversations_error_truncate_or_drop(tmp_path, tok):
    rows = [{"messages": CHAT}, {"messages": _long_chat(10)}]
    files = _files(tmp_path, rows)
    with pytest.raises(
        DataError, match=r"row 1: the conversation has \d+ tokens, more than data.max_length=120"
    ) as e:
        load_chat(ChatDataConfig(data_files=files, max_length=120), tok)
    assert "data.overlong=truncate" in e.value.hint
    train, _ = load_chat(ChatDataConfig(data_files=files, max_length=120, overlong="truncate"), tok)
    assert len(train) == 2 and len(train[1]["input_ids"]) <= 120
    assert train[1]["labels"][-2] == tok.eos_token_id  # cut after a whole assistant turn (+ its <|im_end|>)
    # exactly the longest prefix of whole turns that fits, tokenized on its own
    fits = [
        e
        for k in (2, 4, 6, 8)
        if len((e := tokenize_conversation(tok, _long_chat(10)[:k]))["input_ids"]) <= 120
    ]
    assert train[1] == fits[-1]
    train, _ = load_chat(ChatDataConfig(data_files=files, max_length=120, overlong="drop"), tok)
    assert len(train) == 1


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([{"text": "hello"}], r"column 'messages' not in the data set.*it has \['text'\]"),
        ([{"messages": [{"role": "bot", "content": "hi"}]}], r"row 0, message 0: unknown role 'bot'"),
        ([{"messages": CHAT}, {"messages": []}], r"row 1: empty conversation"),
        ([{"messages": CHAT[:1]}], r"row 0: no assistant message"),
    ],
)
def test_bad_data_names_the_row_and_the_fix(tmp_path, tok, rows, match):
    with pytest.raises(DataError, match=match):
        load_chat(ChatDataConfig(data_files=_files(tmp_path, rows)), tok)


def test_tokenizer_without_chat_template(tmp_path, tok):
    import copy

    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(DataError, match="has no chat template") as e:
        load_chat(ChatDataConfig(data_files=_files(tmp_path, [{"messages": CHAT}])), plain)
    assert "chat_template" in e.value.hint


# ----------------------------------------------------------------------------------------------------
# packing


def test_pack_bins_fit_and_cover():
    lengths = [5, 9, 3, 7, 1, 10, 2, 6]
    bins = pack_bins(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 5  # sum 43 -> at least 5 bins of 10
    with pytest.raises(ValueError):
        pack_bins([11], 10)


def test_block_causal_mask():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    m = block_causal_mask(pos)[0, 0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ]
    )
    assert torch.equal(m, expected)


def _tiny_llama(vocab=97, attn="sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation=attn,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).double().eval()


def _conversations(n, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 20, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        labels = [
            i if k >= length // 2 else IGNORE_INDEX for k, i in enumerate(ids)
        ]  # 2nd half = "assistant"
        out.append({"input_ids": ids, "labels": labels})
    return out


def _per_token_losses(model, batch):
    """{(row, position): loss} of every target token of a batch."""
    kw = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**kw).logits
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    return [losses[r][batch["labels"][r, 1:] != IGNORE_INDEX] for r in range(losses.shape[0])]


@pytest.mark.parametrize(
    ("attention", "attn", "flatten"),
    [
        ("position_ids", "sdpa", False),
        ("position_ids", "eager", False),
        ("position_ids", "sdpa", True),  # one padding-free row: the layout flash-attention's varlen needs
        ("4d", "sdpa", False),
        ("4d", "eager", False),
    ],
)
def test_packed_batch_matches_conversations_one_by_one(attention, attn, flatten):
    from datasets import Dataset

    if attention == "position_ids" and packed_attention_path() != "position_ids":
        pytest.skip("this transformers does not detect packed sequences from position_ids")
    model = _tiny_llama(attn=attn)
    convs = _conversations(9)
    # reference: each conversation alone, padded batch (attention_mask) — one row per conversation
    ref = _per_token_losses(model, PaddedChatCollator(pad_token_id=0)(convs))
    ref_by_conv = {tuple(c["input_ids"]): r for c, r in zip(convs, ref)}

    ds = Dataset.from_dict({k: [c[k] for c in convs] for k in ("input_ids", "labels")})
    packed = pack(ds, max_length=40, seed=1)
    assert len(packed) < len(convs)
    mask_dtype = torch.float64 if (attention, attn) == ("4d", "eager") else None  # eager adds the mask
    collate = PackedChatCollator(pad_token_id=0, attention=attention, mask_dtype=mask_dtype, flatten=flatten)
    batch = collate(list(packed))
    assert batch["input_ids"].shape[0] == (1 if flatten else len(packed))
    if flatten:
        assert batch["input_ids"].shape[1] == sum(len(r) for r in packed["input_ids"])  # no padding
    got = torch.cat(_per_token_losses(model, batch))  # targets in row order; padding has none
    # walk the packed rows' conversations (positions restart at 0) in the same order
    start, n_checked = 0, 0
    for row in packed:
        ids, pos = row["input_ids"], row["position_ids"]
        bounds = [i for i, p in enumerate(pos) if p == 0] + [len(ids)]
        for a, b in zip(bounds, bounds[1:]):
            expected = ref_by_conv[tuple(ids[a:b])]
            torch.testing.assert_close(got[start : start + len(expected)], expected, rtol=1e-9, atol=1e-9)
            start += len(expected)
            n_checked += 1
    assert start == len(got) and n_checked == len(convs)  # boundaries and padding contribute no targets


def test_packing_without_the_mask_would_leak():
    """Control: the same packed row with a plain causal mask gives different losses (the test has teeth)."""
    from datasets import Dataset

    model = _tiny_llama()
    convs = _conversations(6)
    ds = Dataset.from_dict({k: [c[k] for c in convs] for k in ("input_ids", "labels")})
    batch = PackedChatCollator(pad_token_id=0, attention="4d")(list(pack(ds, 40)))
    good = torch.cat(_per_token_losses(model, batch))
    leaky = dict(batch, attention_mask=torch.ones(batch["input_ids"].shape, dtype=torch.long))
    del leaky["position_ids"]
    assert not torch.allclose(torch.cat(_per_token_losses(model, leaky)), good)


def test_position_ids_path_needs_the_cache_off():
    """transformers skips packed-sequence detection when a KV cache exists, and Llama's config has
    use_cache=True (even in train mode): without the collator's use_cache=False the rows would leak."""
    from datasets import Dataset

    if packed_attention_path() != "position_ids":
        pytest.skip("this transformers does not detect packed sequences from position_ids")
    model = _tiny_llama()
    assert model.config.use_cache
    convs = _conversations(6)
    ds = Dataset.from_dict({k: [c[k] for c in convs] for k in ("input_ids", "labels")})
    batch = PackedChatCollator(pad_token_id=0, attention="position_ids")(list(pack(ds, 40)))
    assert batch["use_cache"] is False
    good = torch.cat(_per_token_losses(model, batch))
    no_flag = {k: v for k, v in batch.items() if k != "use_cache"}
    assert not torch.allclose(torch.cat(_per_token_losses(model.train(), no_flag)), good)


# ----------------------------------------------------------------------------------------------------
# token-count loss


def test_token_loss_is_sum_and_count():
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100, 4, 5], [-100, -100, 3, -100, 7]])
    loss_sum, n = token_loss(logits, labels)
    manual = sum(
        -torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
        for b in range(2)
        for t in range(1, 5)
        if labels[b, t] >= 0
    )
    assert int(n) == 5 == int(count_target_tokens(labels))
    torch.testing.assert_close(loss_sum, manual.float())


def test_grad_accumulation_1x8_equals_4x2():
    """The step's loss is the mean over ALL its target tokens, however it is cut into micro-batches."""
    model = _tiny_llama().float().train()
    convs = _conversations(8, seed=3)
    collate = PaddedChatCollator(pad_token_id=0)

    def step_grads(micro_batches):
        model.zero_grad()
        batches = [collate(convs[i : i + micro_batches]) for i in range(0, 8, micro_batches)]
        n_step = sum(count_target_tokens(b["labels"]) for b in batches)  # all-reduced over ranks in the loop
        for b in batches:
            loss_sum, _ = batch_token_loss(model, b)
            step_loss(loss_sum, n_step).backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(step_grads(8), step_grads(2)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # and the reference: one batch of all 8, the mean over its target tokens
    model.zero_grad()
    b = collate(convs)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    loss_sum, n = token_loss(logits, b["labels"])
    (loss_sum / n).backward()
    ref = [p.grad.clone() for p in model.parameters()]
    for a, r in zip(step_grads(2), ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)


def test_chitchat_asset_build_from_a_wheel(tmp_path):
    """The asset's build step on a wheel-shaped zip: JSONL splits in the messages format, LICENSE kept."""
    import zipfile

    from shardwise.data.assets import ASSETS

    u = lambda text, s: {"text": text, "sender": s, "timestamp": "t"}
    chats = {f"id{i:02d}": {"messages": [[u(f"q{i}", "a")], [u(f"r{i}", "b")]]} for i in range(40)}
    chats["lonely"] = {"messages": [[u("hello?", "a")]]}
    wheel = tmp_path / "chitchat_dataset-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("chitchat_dataset/dataset.json", json.dumps(chats))
        zf.writestr("chitchat_dataset-0.9.0.dist-info/LICENSE", "MIT License")
    out = tmp_path / "data" / "chitchat"
    ASSETS["chitchat"].build(wheel, out)
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (out / "validation.jsonl").read_text().splitlines()]
    assert (
        len(train) + len(val) == 40 and len(val) == 2
    )  # the one-sender chat is dropped; every 20th held out
    assert train[0]["messages"] == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "r1"}]
    assert (out / "LICENSE").read_text() == "MIT License"


def test_config_section_is_strict_and_picks_the_collator(tok):
    from shardwise.configfile import ConfigError, from_dict
    from shardwise.data.chat import chat_collator

    cfg = from_dict(ChatDataConfig, {"max_length": 256, "packing": True, "overlong": "truncate"})
    assert cfg.data_files["train"] == "assets:data/chitchat/train.jsonl"
    with pytest.raises(ConfigError, match="did you mean 'packing'"):
        from_dict(ChatDataConfig, {"packign": True})
    with pytest.raises(ConfigError, match="overlong.*did you mean 'truncate'"):
        from_dict(ChatDataConfig, {"overlong": "truncat"})
    assert isinstance(chat_collator(ChatDataConfig(), tok), PaddedChatCollator)
    assert not chat_collator(cfg, tok, "sdpa").flatten
    assert chat_collator(cfg, tok, "flash_attention_2").flatten
    assert chat_collator(cfg, tok).pad_token_id == tok.pad_token_id
