"""Packing: whole conversations per row, position ids restarting per conversation, attention kept
inside each conversation; the padded and packed collators.

Conversations are packed whole (best-fit decreasing) into rows of at most ``max_length`` tokens;
``position_ids`` restart at 0 for each conversation and the first token of each conversation is never a
target, so no token is predicted from another conversation. Attention stays inside a conversation
through one of two paths (:func:`packed_attention_path`):

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
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .masking import IGNORE_INDEX


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
