"""Per-tensor loop: the readable spec of :mod:`shardwise.optim.rule` and the test oracle.

Each line below is one line of the rule's docstring, applied to one parameter at a time in the
parameter's own dtype (as ``torch.optim`` does). State tensors are updated in place.
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
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        if rule.maximize:
            g = -g
        if s.weight_decay != 0:
            if rule.decoupled:
                p.mul_(s.decay_factor)
            else:
                g = g.add(p, alpha=s.weight_decay)
        m.lerp_(g, 1 - s.beta1)
        v.mul_(s.beta2)
        if rule.belief:
            residual = g - m
            v.addcmul_(residual, residual, value=1 - s.beta2).add_(s.eps)
        else:
            v.addcmul_(g, g, value=1 - s.beta2)
        if rule.amsgrad:
            torch.maximum(max_exp_avg_sqs[i], v, out=max_exp_avg_sqs[i])
            v = max_exp_avg_sqs[i]
        denom = v.sqrt().mul_(s.denom_scale).add_(s.denom_eps)
        p.addcdiv_(m, denom, value=-s.step_size)
