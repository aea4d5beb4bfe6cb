"""Chat SFT data: conversations in the ``messages`` format, the model's own chat template, loss on the
assistant's turns only (end-of-turn token included) and optional packing; the token-count loss that
trains on them is :mod:`shardwise.train.losses`.

Input is what trl and the hub use: a ``messages`` column holding ``[{"role", "content"}, ...]`` per row,
from any ``datasets.load_dataset`` source (hub name, or ``json`` over local JSON/JSONL files; the
default is the chitchat-dataset asset). The pieces, in the order a recipe uses them::

    train, evals = load_chat(cfg.data, tokenizer, seed)          # dataset.py: validate, render, mask, pack
    collate = chat_collator(cfg.data, tokenizer, attn_impl)      # dataset.py: padded or packed batches
    run_training(..., loss_fn=batch_token_loss,                  # train/losses.py: sum and count of targets
                 count_targets=lambda b: count_target_tokens(b["labels"]))  # the loop normalizes per step
    # a hand-written loop: step_loss(loss_sum, n_step_all_ranks, world_size).backward()

- ``masking.py``: how assistant tokens are found (prefix renderings of the template, one tokenization);
- ``packing.py``: best-fit packing, restarting ``position_ids``, and the two attention paths that keep
  packed conversations apart (transformers' packed-sequence detection, or an explicit 4-D mask).
"""

from .dataset import ChatDataConfig, chat_collator, encode_conversations, load_chat
from .masking import (
    IGNORE_INDEX,
    ROLES,
    OverlongConversation,
    check_chat_template,
    end_of_turn_ids,
    tokenize_conversation,
    validate_messages,
)
from .packing import (
    PackedChatCollator,
    PaddedChatCollator,
    block_causal_mask,
    pack,
    pack_bins,
    packed_attention_path,
    recommended_attn_implementation,
)

__all__ = [
    "IGNORE_INDEX",
    "ROLES",
    "ChatDataConfig",
    "OverlongConversation",
    "PackedChatCollator",
    "PaddedChatCollator",
    "block_causal_mask",
    "chat_collator",
    "check_chat_template",
    "encode_conversations",
    "end_of_turn_ids",
    "load_chat",
    "pack",
    "pack_bins",
    "packed_attention_path",
    "recommended_attn_implementation",
    "tokenize_conversation",
    "validate_messages",
]
