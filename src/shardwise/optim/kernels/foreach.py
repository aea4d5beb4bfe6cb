"""Multi-tensor implementation: the rule with ``torch._foreach_*`` ops over one bucket.

A bucket is a list of tensors sharing device, dtype and step (the caller groups them), so each line
of the rule is one multi-tensor kernel launch instead of one per parameter.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rule import Rule, StepScalars


def adam_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None,
    *,
    rule: Rule,
    scalars: StepScalars,
) -> None:
    s = scalars
    if rule.maximize:
        grads = torch._foreach_neg(grads)
    if s.weight_decay != 0:
        if rule.decoupled:
            torch._foreach_mul_(params, s.decay_factor)
        else:
            grads = torch._foreach_add(grads, params, alpha=s.weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - s.beta1)
    torch._foreach_mul_(exp_avg_sqs, s.beta2)
    if rule.belief:
        residuals = torch._foreach_sub(grads, exp_avgs)
        torch._foreach_addcmul_(exp_avg_sqs, residuals, residuals, value=1 - s.beta2)
        torch._foreach_add_(exp_avg_sqs, s.eps)
        del residuals
    else:
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - s.beta2)
    second = exp_avg_sqs
    if rule.amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        second = max_exp_avg_sqs
    if s.denom_scale == 0:  # un-rectified RAdam: the denominator is exactly 1
        torch._foreach_add_(params, exp_avgs, alpha=-s.step_size)
        return
    denoms = torch._foreach_sqrt(second)
    torch._foreach_mul_(denoms, s.denom_scale)
    torch._foreach_add_(denoms, s.denom_eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, value=-s.step_size)
