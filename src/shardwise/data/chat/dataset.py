"""The chat data config section made real: ``messages`` rows -> tokenized (optionally packed) splits,
and the collator that batches them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from shardwise.errors import DataError

from ..text import DataFiles, _split, _take, load_raw
from .masking import (
    IGNORE_INDEX,
    OverlongConversation,
    check_chat_template,
    end_of_turn_ids,
    tokenize_conversation,
    validate_messages,
)
from .packing import PackedChatCollator, PaddedChatCollator, pack, packed_attention_path


@dataclass
class ChatDataConfig:
    """Which conversations and how they become rows. Defaults: chitchat-dataset from the asset cache."""

    # datasets.load_dataset path: a hub data set with a messages column, or "json" over local files
    dataset: str = "json"
    name: str | None = None
    data_files: DataFiles | None = field(
        default_factory=lambda: {
            "train": "assets:data/chitchat/train.jsonl",
            "validation": "assets:data/chitchat/validation.jsonl",
        }
    )
    train_split: str = "train"
    eval_split: str = "validation"
    messages_column: str = "messages"
    max_length: int = 512  # tokens per conversation (and per packed row)
    # a conversation longer than max_length: "error" stops with its row number; "truncate" keeps its
    # longest prefix that ends with an assistant turn and fits; "drop" skips it
    overlong: Literal["error", "truncate", "drop"] = "error"
    packing: bool = False  # several conversations per row, attention kept inside each
    max_train_samples: int | None = None  # conversations, first N after a seeded shuffle
    max_eval_samples: int | None = None

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {value}")


def encode_conversations(rows: Sequence[Any], tokenizer, cfg: ChatDataConfig, split: str) -> dict:
    """Validate and tokenize ``(row, messages)`` pairs: columns input_ids, labels (dropped rows left out)."""
    out: dict[str, list] = {"input_ids": [], "labels": []}
    end_ids = end_of_turn_ids(tokenizer)
    for row, messages in rows:
        where = f"data split {split!r}, row {row}"
        messages = validate_messages(messages, where)
        truncate = cfg.overlong == "truncate"
        try:
            enc = tokenize_conversation(tokenizer, messages, where, cfg.max_length, truncate, end_ids)
        except OverlongConversation:
            if cfg.overlong == "error":
                raise
            continue
        if enc is None:  # truncate: not even the first assistant turn fits
            continue
        if all(x == IGNORE_INDEX for x in enc["labels"]):
            continue
        out["input_ids"].append(enc["input_ids"])
        out["labels"].append(enc["labels"])
    return out


def load_chat(cfg: ChatDataConfig, tokenizer, seed: int = 0):
    """Tokenized (train, eval) datasets with ``input_ids`` and ``labels`` (packed: + ``position_ids``)."""
    check_chat_template(tokenizer)
    raw = load_raw(cfg.dataset, cfg.name, cfg.data_files)

    def prepare(split: str, what: str, limit: int | None):
        ds = _split(raw, split, what)
        if cfg.messages_column not in ds.column_names:
            raise DataError(
                f"data.messages_column: column {cfg.messages_column!r} not in the data set ({split!r} "
                f"split); it has {ds.column_names}",
                hint="chat data needs a column of [{'role', 'content'}, ...] lists; set "
                "data.messages_column to its name",
            )
        ds = _take(ds, limit, seed)

        def encode(batch, idx):
            return encode_conversations(list(zip(idx, batch[cfg.messages_column])), tokenizer, cfg, split)

        out = ds.map(
            encode, batched=True, with_indices=True, remove_columns=ds.column_names, desc="tokenize chats"
        )
        if len(out) == 0:
            raise DataError(f"no usable conversation in the {split!r} split (all dropped or empty)")
        return pack(out, cfg.max_length, seed) if cfg.packing else out

    train = prepare(cfg.train_split, "train_split", cfg.max_train_samples)
    evals = prepare(cfg.eval_split, "eval_split", cfg.max_eval_samples)
    return train, evals


# ----------------------------------------------------------------------------------------------------
# the collator


def chat_collator(
    cfg: ChatDataConfig, tokenizer, attn_implementation: str | None = None
) -> Callable[[list[dict]], dict]:
    """The collator for ``cfg.packing`` and the model's attention; pad id: the tokenizer's, else EOS.

    Packed rows under flash attention are flattened into one row (its varlen kernel needs that);
    under SDPA / eager they keep one row each, kept apart by the packed-sequence mask.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an EOS token to pad batches with")
    if not cfg.packing:
        return PaddedChatCollator(pad)
    flash = (attn_implementation or "").startswith("flash")
    if flash and packed_attention_path() != "position_ids":
        raise DataError(
            "data.packing with flash attention needs transformers' packed-sequence support (5.x)",
            hint="upgrade transformers, or use attn_implementation=sdpa",
        )
    return PackedChatCollator(pad, flatten=flash)
