"""The token-count loss of causal LMs (GPT and SFT recipes): sums and counts of per-token losses,
normalized over a whole optimizer step.

:func:`token_loss` returns the SUM of per-token cross-entropies over target tokens and their count. The
mean over the assistant tokens of a whole optimizer step (all micro-batches, all processes) is
``sum_k loss_sum_k / N_step`` with ``N_step = all_reduce(sum_k n_k)``; see :func:`step_loss`. Not a mean
of per-micro-batch means, which would weight a short micro-batch's tokens more than a long one's.
"""

from __future__ import annotations

from typing import Any

import torch

from shardwise.data.chat.masking import IGNORE_INDEX


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


def row_token_losses(model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (sum of target-token cross-entropies, number of targets), shapes (B,), for evaluation.

    Per-row values let ``accelerator.gather_for_metrics`` drop the rows that even batches duplicated
    on the last batch, so an evaluation counts every held-out token once.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits, labels = model(**inputs).logits[:, :-1].float(), batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return per_token.sum(1), (labels != IGNORE_INDEX).sum(1)
