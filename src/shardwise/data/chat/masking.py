"""Conversations -> token ids and labels: the model's own chat template, loss on assistant turns only.

A conversation is rendered once with the tokenizer's ``apply_chat_template``. The text of assistant
message i is the part of the full rendering between ``render(messages[:i], add_generation_prompt=True)``
and ``render(messages[:i + 1])`` (both must be string prefixes of the full rendering; the template's
own end-of-turn text is inside that span). The full text is tokenized once; a token is a target (label
= its id) when its characters lie in an assistant span, else -100. The span is cut after the last
end-of-turn token (the tokenizer's EOS, ``<|im_end|>`` for SmolLM2) so the model learns to stop, and
not to emit the newline the template puts after it. This needs no ``{% generation %}`` markers in the
template (SmolLM2's has none); the test checks it token by token.
"""

from __future__ import annotations

import bisect
from typing import Any

from shardwise.errors import DataError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


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
