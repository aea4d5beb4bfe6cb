"""The fused path where the native C++ kernel does not run (CUDA): one compiled function per tensor.

The rule of :mod:`shardwise.optim.rule`, written as plain tensor arithmetic with the per-step
scalars in a small device tensor, and the codec of :mod:`shardwise.optim.quant`, compiled together
by ``torch.compile``: Inductor turns decode, update and encode into a few fused kernels (Triton on
CUDA, C++/OpenMP on CPU). Scalars live in a tensor because ``torch.compile`` specializes on Python
floats, and the bias corrections change every step: this way each (rule, dtype, shape) compiles
once, then the step only launches kernels.

The same code compiles for CPU, which is how the tests check this path on machines without a GPU;
on CPU the optimizer uses the native kernel instead. On CUDA it serves ``impl="fused"``;
``impl="auto"`` stays on ``foreach`` there until this path has been measured on a GPU
(``bench/gpu.sh``).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import quant
from ..rule import Rule, StepScalars

# Order of the scalars in the device tensor. 1 - beta is computed on the host in double, as the
# other implementations do: 1 - beta2 in fp32 would be off by 1e-5 relative.
_BETA2, _ONE_MINUS_BETA1, _ONE_MINUS_BETA2, _WEIGHT_DECAY, _DECAY_FACTOR, _EPS = range(6)
_STEP_SIZE, _DENOM_SCALE, _DENOM_EPS = range(6, 9)


def available(device: torch.device) -> bool:
    """Whether ``impl="fused"`` can compile for ``device`` (CUDA needs Triton)."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return device.type == "cpu"


def why_unavailable(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.compile needs Triton for CUDA, and it is not installed"
    return f"no compiled path for {device.type}"


def _scalars(s: StepScalars, dtype: torch.dtype, device: torch.device) -> Tensor:
    values = (s.beta2, 1 - s.beta1, 1 - s.beta2, s.weight_decay, s.decay_factor, s.eps, s.step_size)
    return torch.tensor((*values, s.denom_scale, s.denom_eps), dtype=dtype, device=device)


def _moments(rule: Rule, p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: Tensor):
    """Weight decay and the two moments: the first lines of rule.py's docstring."""
    if rule.maximize:
        g = -g
    if rule.decoupled:
        p = p * s[_DECAY_FACTOR]
    else:
        g = g + s[_WEIGHT_DECAY] * p
    m = m + s[_ONE_MINUS_BETA1] * (g - m)
    if rule.belief:
        residual = g - m
        v = s[_BETA2] * v + s[_ONE_MINUS_BETA2] * residual * residual + s[_EPS]
    else:
        v = s[_BETA2] * v + s[_ONE_MINUS_BETA2] * g * g
    return p, m, v


def _apply(p: Tensor, m: Tensor, second: Tensor, s: Tensor) -> Tensor:
    """The parameter step of rule.py, given the second moment in use."""
    return p - s[_STEP_SIZE] * m / (second.sqrt() * s[_DENOM_SCALE] + s[_DENOM_EPS])


def _step_full(rule: Rule, p, g, m, v, u, s) -> None:
    acc = s.dtype
    p_new, m_new, v_new = _moments(rule, p.to(acc), g.to(acc), m.to(acc), v.to(acc), s)
    second = v_new
    if rule.amsgrad:
        second = torch.maximum(u.to(acc), v_new)
        u.copy_(second)
    p.copy_(_apply(p_new, m_new, second, s))
    m.copy_(m_new)
    v.copy_(v_new)


def _step_8bit(rule: Rule, p, g, m_codes, v_codes, u_codes, m_absmax, v_absmax, u_absmax, s) -> None:
    acc = s.dtype
    m = quant.decode(m_codes, m_absmax, True, acc)
    v = quant.decode(v_codes, v_absmax, False, acc)
    p_new, m, v = _moments(rule, p.to(acc), g.to(acc), m, v, s)
    second = v
    if rule.amsgrad:
        second = torch.maximum(quant.decode(u_codes, u_absmax, False, acc), v)
        quant.encode_into(second, u_codes, u_absmax, signed=False)
    p.copy_(_apply(p_new, m, second, s))
    quant.encode_into(m, m_codes, m_absmax, signed=True)
    quant.encode_into(v, v_codes, v_absmax, signed=False)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, fullgraph=True)


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
    """Full-precision state; same signature as the other implementations."""
    step = _compiled(_step_full)
    s = _scalars(scalars, torch.promote_types(params[0].dtype, torch.float32), params[0].device)
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        step(rule, p, g, m, v, max_exp_avg_sqs[i] if rule.amsgrad else None, s)


def adam_update_8bit(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None,
    exp_avg_absmax: list[Tensor],
    exp_avg_sq_absmax: list[Tensor],
    max_exp_avg_sq_absmax: list[Tensor] | None,
    *,
    rule: Rule,
    scalars: StepScalars,
) -> None:
    """8-bit state: codes and per-block absmax updated in place; same signature as the native one."""
    step = _compiled(_step_8bit)
    s = _scalars(scalars, torch.promote_types(params[0].dtype, torch.float32), params[0].device)
    for i, p in enumerate(params):
        u, ua = (max_exp_avg_sqs[i], max_exp_avg_sq_absmax[i]) if rule.amsgrad else (None, None)
        m, v, ma, va = exp_avgs[i], exp_avg_sqs[i], exp_avg_absmax[i], exp_avg_sq_absmax[i]
        step(rule, p, grads[i], m, v, u, ma, va, ua, s)
