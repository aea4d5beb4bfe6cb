"""Chat SFT data: conversations in the ``messages`` format, the model's own chat template, loss on the
assistant's turns only, optional packing, and the token-count loss.

Input is what trl and the hub use: a ``messages`` column holding ``[{"role", "content"}, ...]`` per row,
from any ``datasets.load_dataset`` source (hub name, or ``json`` over local JSON/JSONL files; the
default is the chitchat-dataset asset).

Masking. A conversation is rendered once with the tokenizer's ``apply_chat_template``. The text of
assistant message i is the part of the full rendering between ``render(messages[:i],
add_generation_prompt=True)`` and ``render(messages[:i + 1])`` (both must be string prefixes of the
full rendering; the template's own end-of-turn text is inside that span). The full text is tokenized
once; a token is a target (label = its id) when its characters lie in an assistant span, else -100.
The span is cut after the last end-of-turn token (the tokenizer's EOS, ``<|im_end|>`` for SmolLM2) so
the model learns to stop, and not to emit the newline the template puts after it. This needs no
``{% generation %}`` markers in the template (SmolLM2's has none), and the test checks it token by token.

Packing. Conversations are packed whole (best-fit decreasing) into rows of at most ``max_length``
tokens; ``position_ids`` restart at 0 for each conversation and the first token of each conversation
is never a target, so no token is predicted from another conversation. Attention stays inside a
conversation through one of two paths (:func:`packed_attention_path`):

- ``"position_ids"`` (transformers 5.x; feature-detected): no ``attention_mask`` in the batch; transformers
  derives the sequence boundaries from ``position_ids`` (``masking_utils.find_packed_sequence_indices``)
  and builds the block-diagonal causal mask for eager / SDPA, or calls flash-attention's varlen kernel
  (``cu_seqlens``) when ``attn_implementation="flash_attention_2"``. The model must run with
  ``use_cache=False``: a cache disables the detection, Llama's config has ``use_cache=True`` even in
  train mode, and the rows would then silently attend across conversations (a test checks it). The
  collator puts ``use_cache=False`` in the batch; a loop that builds its own batches must do the same.
  Flash attention takes that path only for a batch of ONE row: the flash collator flattens the
  batch into one padding-free row (``PackedChatCollator(flatten=True)``).
- ``"4d"`` (older transformers): the collator builds the block-diagonal causal mask itself,
  ``attention_mask`` of shape (batch, 1, L, L): boolean for SDPA, additive (``mask_dtype``) for eager.

Loss. :func:`token_loss` returns the SUM of per-token cross-entropies over target tokens and their
count. The mean over the assistant tokens of a whole optimizer step (all micro-batches, all processes)
is ``sum_k loss_sum_k / N_step`` with ``N_step = all_reduce(sum_k n_k)``; see :func:`step_loss`.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from shardwise.train.errors import DataError

from .text import DataFiles, _split, _take, load_raw

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


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


# ----------------------------------------------------------------------------------------------------
# validation and rendering


def check_chat_template(tokenizer) -> None:
    """A tokenizer without a chat template cannot render conversations: say which one to use."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"the tokenizer {name!r} has no chat template, so conversations cannot be rendered",
            hint="use an instruct/chat model's tokenizer (model.tokenizer), or set tokenizer.chat_template "
            "(a Jinja string, e.g. from a chat_template.jinja file) before loading the data",
        )


def validate_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """The conversation as a list of {"role", "content"} dicts, or a DataError naming ``where``."""
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise DataError(
            f"{where}: empty conversation (messages={messages!r})",
            hint="remove empty rows from the data, or filter them before training",
        )
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}, message {j}: expected {{'role', 'content'}}, got {m!r}")
        if m["role"] not in ROLES:
            raise DataError(
                f"{where}, message {j}: unknown role {m['role']!r}; roles are {list(ROLES)}",
                hint="map the data set's speaker names to user / assistant (and system) first",
            )
        if not isinstance(m["content"], str):
            raise DataError(f"{where}, message {j}: content must be a string, got {m['content']!r}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(
            f"{where}: no assistant message, so nothing to learn from this conversation",
            hint="filter conversations without an assistant reply",
        )
    return out


def _render(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _assistant_spans(tokenizer, messages, full: str, limit: int, where: str) -> list[tuple[int, int]]:
    """Character spans of the assistant messages (incl. the template's end text) that end by ``limit``."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise DataError(
                f"{where}: the conversation starts with an assistant message",
                hint="start conversations with a user (or system) message",
            )
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1])
        if not (full.startswith(before) and full.startswith(upto)):
            raise DataError(
                f"{where}: the chat template renders a conversation's prefix differently from the "
                "conversation itself, so assistant turns cannot be located",
                hint="use a template whose rendering of messages[:i] is a prefix of the whole (most are), "
                "or one with {% generation %} markers",
            )
        if len(upto) > limit:
            break
        spans.append((len(before), len(upto)))
    return spans


def _cut_after_end_of_turn(ids: list[int], labels: list[int], end_ids: set[int]) -> None:
    """In each target run, untarget what follows its last end-of-turn token (template whitespace)."""
    i, n = 0, len(labels)
    while i < n:
        if labels[i] == IGNORE_INDEX:
            i += 1
            continue
        j = i
        while j < n and labels[j] != IGNORE_INDEX:
            j += 1
        last = max((k for k in range(i, j) if ids[k] in end_ids), default=None)
        if last is not None:
            for k in range(last + 1, j):
                labels[k] = IGNORE_INDEX
        i = j


def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that end an assistant turn: the EOS token (``<|im_end|>`` for ChatML templates)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")  # get_vocab() would copy the whole vocabulary
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return ids


class OverlongConversation(DataError):
    """A conversation has more tokens than ``data.max_length`` (and truncation is off)."""


def tokenize_conversation(
    tokenizer,
    messages: list[dict[str, str]],
    where: str = "conversation",
    max_length: int | None = None,
    truncate: bool = False,
    end_ids: set[int] | None = None,
) -> dict | None:
    """``input_ids`` of the rendered conversation and ``labels`` (-100 except assistant turns + EOT).

    A conversation longer than ``max_length`` raises :class:`OverlongConversation`, or with
    ``truncate`` is cut after its last assistant turn that fits (None when not even the first fits).
    ``end_ids``: :func:`end_of_turn_ids` (computed once by a caller that tokenizes many conversations).
    """
    full = _render(tokenizer, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    limit = len(full)
    if max_length is not None and len(ids) > max_length:
        if not truncate:
            raise OverlongConversation(
                f"{where}: the conversation has {len(ids)} tokens, more than data.max_length={max_length}",
                hint="raise data.max_length, or set data.overlong=truncate (keep the turns that fit) "
                "or data.overlong=drop",
            )
        limit = offsets[max_length - 1][1]  # characters covered by the first max_length tokens
    spans = _assistant_spans(tokenizer, messages, full, limit, where)
    n = len(ids)
    if limit < len(full):  # truncated: keep the tokens up to the end of the last assistant turn that fits
        if not spans:
            return None
        cut = spans[-1][1]
        n = bisect.bisect_right([b for _, b in offsets], cut)
        if n < len(ids) and offsets[n][0] < cut:
            raise DataError(f"{where}: no token boundary after assistant turn ending at character {cut}")
        ids = ids[:n]
    labels = [IGNORE_INDEX] * n
    j = 0
    for t in range(n):  # tokens and spans are both sorted: one merge pass
        a, b = offsets[t]
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        if j == len(spans) or b <= a:
            continue
        s, e = spans[j]
        if s <= a and b <= e:
            labels[t] = ids[t]
        elif a < s < b or a < e < b:
            raise DataError(
                f"{where}: token {t} ({full[a:b]!r}) straddles an assistant turn's boundary",
                hint="the chat template should put a special token or newline between turns",
            )
    _cut_after_end_of_turn(ids, labels, end_ids if end_ids is not None else end_of_turn_ids(tokenizer))
    return {"input_ids": ids, "labels": labels}


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
# packing


def pack_bins(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: indices grouped into bins whose total length is <= max_length."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining room, bin index), sorted
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"item {i} has length {n} > max_length {max_length}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (max_length - n, len(bins) - 1))
    return bins


def pack(ds, max_length: int, seed: int = 0):
    """Rows of whole conversations (input_ids, labels, position_ids), bins shuffled with ``seed``."""
    from datasets import Dataset

    bins = pack_bins([len(x) for x in ds["input_ids"]], max_length)
    random.Random(seed).shuffle(bins)
    ids_col, labels_col = list(ds["input_ids"]), list(ds["labels"])  # python lists: fast row access
    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    for b in bins:
        ids, labels, pos = [], [], []
        for i in b:
            conv_labels = list(labels_col[i])
            conv_labels[0] = IGNORE_INDEX  # never predicted from the previous conversation
            ids += ids_col[i]
            labels += conv_labels
            pos += range(len(ids_col[i]))
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["position_ids"].append(pos)
    return Dataset.from_dict(rows)


def packed_attention_path() -> Literal["position_ids", "4d"]:
    """How this transformers keeps packed conversations apart (see the module docstring)."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return "4d"
    return "position_ids"


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) restarting positions -> (B, 1, L, L) bool mask: causal and inside one conversation."""
    starts = position_ids == 0
    starts[:, 0] = True
    seq = starts.long().cumsum(-1)  # conversation number of each token
    same = seq[:, :, None] == seq[:, None, :]
    causal = torch.ones(position_ids.shape[1], position_ids.shape[1], dtype=torch.bool).tril()
    return (same & causal.to(position_ids.device))[:, None]


def recommended_attn_implementation() -> str:
    """``flash_attention_2`` on CUDA when flash-attn is installed (varlen packing), else ``sdpa``."""
    from transformers.utils import is_flash_attn_2_available

    if torch.cuda.is_available() and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


# ----------------------------------------------------------------------------------------------------
# collators


def _pad(rows: list[list[int]], value: int, length: int) -> torch.Tensor:
    return torch.tensor([r + [value] * (length - len(r)) for r in rows], dtype=torch.long)


@dataclass
class PaddedChatCollator:
    """One conversation per row, right-padded to the longest in the batch (or a multiple of ``pad_to``)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = [list(f["input_ids"]) for f in features]
        return {
            "input_ids": _pad(ids, self.pad_token_id, length),
            "attention_mask": _pad([[1] * len(r) for r in ids], 0, length),
            "labels": _pad([list(f["labels"]) for f in features], IGNORE_INDEX, length),
        }


@dataclass
class PackedChatCollator:
    """Packed rows (see :func:`pack`); the padding tail is one more masked "conversation".

    ``attention``: "position_ids" (default where supported) leaves the mask to transformers and sets
    ``use_cache=False``; "4d" adds the block-diagonal causal ``attention_mask`` (B, 1, L, L): boolean
    (True = attend) for SDPA, or additive (0 / dtype min) in ``mask_dtype`` for the eager attention,
    which adds the mask to its scores.
    """

    pad_token_id: int
    attention: Literal["position_ids", "4d"] = field(default_factory=packed_attention_path)
    pad_to_multiple_of: int | None = None
    mask_dtype: torch.dtype | None = None  # "4d" only: None = bool (SDPA); a float dtype = additive
    # all rows as ONE padding-free row (1, total): what flash-attention's varlen path needs
    # (transformers uses it only for batch size 1); also correct, and padding-free, for SDPA / eager
    flatten: bool = False

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        if self.flatten:
            features = [
                {k: [x for f in features for x in f[k]] for k in ("input_ids", "labels", "position_ids")}
            ]
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pos = [list(f["position_ids"]) + list(range(length - len(f["position_ids"]))) for f in features]
        batch: dict[str, Any] = {
            "input_ids": _pad([list(f["input_ids"]) for f in features], self.pad_token_id, length),
            "labels": _pad([list(f["labels"]) for f in features], IGNORE_INDEX, length),
            "position_ids": torch.tensor(pos, dtype=torch.long),
        }
        if self.attention == "4d":
            mask = block_causal_mask(batch["position_ids"])
            if self.mask_dtype is not None:
                additive = torch.zeros(mask.shape, dtype=self.mask_dtype)
                mask = additive.masked_fill_(~mask, torch.finfo(self.mask_dtype).min)
            batch["attention_mask"] = mask
        else:
            batch["use_cache"] = False
        return batch


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


# ----------------------------------------------------------------------------------------------------
# loss normalized by the token count of the optimizer step


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies over target tokens, number of target tokens), in float32.

    Position t predicts token t + 1: ``logits[:, :-1]`` against ``labels[:, 1:]``; -100 is ignored.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    loss_sum = torch.nn.functional.cross_entropy(
        shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, (shift_labels != IGNORE_INDEX).sum()


def count_target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Number of predicted (target) tokens in a batch: what :func:`token_loss` will count."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def step_loss(loss_sum: torch.Tensor, step_tokens: torch.Tensor | int, world_size: int = 1) -> torch.Tensor:
    """A micro-batch's share of the step's mean loss, ready for ``backward``.

    The step's loss is ``L = sum over processes p and micro-batches k of loss_sum_pk / N`` where ``N``
    is the target-token count of the whole step (all micro-batches of all processes: count them with
    :func:`count_target_tokens` before the forward passes and all-reduce the sum). Each micro-batch
    backpropagates ``loss_sum_pk / N``; DDP averages gradients over ``world_size`` processes, hence the
    factor ``world_size``, which makes the summed gradient exactly that of ``L``.
    """
    return loss_sum * world_size / torch.as_tensor(step_tokens, dtype=loss_sum.dtype).clamp_min(1)


def batch_token_loss(model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward a collated batch without its labels; :func:`token_loss` of the logits against them.

    The labels stay out of the model call so that the model does not compute (and average) a loss of
    its own; the caller normalizes the sum with :func:`step_loss`.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return token_loss(model(**inputs).logits, batch["labels"])
