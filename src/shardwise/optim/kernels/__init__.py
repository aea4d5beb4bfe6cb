"""Three implementations of :mod:`shardwise.optim.rule`, one keyword-only signature::

    adam_update(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, rule, scalars)

``reference`` loops over tensors (the spec), ``foreach`` uses multi-tensor ops, ``fused`` runs one
native kernel per bucket. :func:`run` is the 8-bit codec seam: for 8-bit buckets the fused kernel
works on codes directly (one pass over memory), the others decode to full precision, apply the
same signature, and re-encode (:mod:`shardwise.optim.quant`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import quant
from ..rule import Rule, StepScalars
from . import compiled, foreach, fused, reference

IMPLS = ("reference", "foreach", "fused")
_IMPLS = {"reference": reference.adam_update, "foreach": foreach.adam_update}


@dataclass
class Bucket:
    """Tensors that one kernel call updates: same device, dtype, step and state format.

    For 8-bit buckets the state lists hold codes and ``*_absmax`` holds the per-block scales.
    """

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    max_exp_avg_sqs: list[Tensor] | None
    exp_avg_absmax: list[Tensor] | None = None
    exp_avg_sq_absmax: list[Tensor] | None = None
    max_exp_avg_sq_absmax: list[Tensor] | None = None

    @property
    def quantized(self) -> bool:
        return self.exp_avg_absmax is not None


def fused_available(device: torch.device) -> tuple[bool, str]:
    """Whether ``impl="fused"`` runs on ``device`` (native kernel on CPU, torch.compile elsewhere)."""
    backend = fused if device.type == "cpu" else compiled
    return backend.available(device), backend.why_unavailable(device)


def run(impl: str, bucket: Bucket, *, rule: Rule, scalars: StepScalars) -> None:
    """Apply one step of ``rule`` to ``bucket`` with implementation ``impl``."""
    if impl == "fused":  # works on codes directly; off CPU it is the torch.compile path
        backend = fused if bucket.params[0].device.type == "cpu" else compiled
        step_with(backend, bucket, rule=rule, scalars=scalars)
        return
    update = _IMPLS[impl]
    if not bucket.quantized:
        _full(update, bucket, rule=rule, scalars=scalars)
        return
    # The moments live in fp32 (fp64 for fp64 params) between decode and encode, whatever the
    # parameter dtype, exactly as in the fused kernel.
    dtype = torch.promote_types(bucket.params[0].dtype, torch.float32)
    m = [quant.decode(c, a, True, dtype) for c, a in zip(bucket.exp_avgs, bucket.exp_avg_absmax)]
    v = [quant.decode(c, a, False, dtype) for c, a in zip(bucket.exp_avg_sqs, bucket.exp_avg_sq_absmax)]
    u = None
    if rule.amsgrad:
        u = [
            quant.decode(c, a, False, dtype)
            for c, a in zip(bucket.max_exp_avg_sqs, bucket.max_exp_avg_sq_absmax)
        ]
    params32 = [p.to(dtype) for p in bucket.params]
    grads32 = [g.to(dtype) for g in bucket.grads]
    update(params32, grads32, m, v, u, rule=rule, scalars=scalars)
    for p, p32 in zip(bucket.params, params32):
        if p32 is not p:
            p.copy_(p32)
    for x, c, a in zip(m, bucket.exp_avgs, bucket.exp_avg_absmax):
        quant.encode_into(x, c, a, signed=True)
    for x, c, a in zip(v, bucket.exp_avg_sqs, bucket.exp_avg_sq_absmax):
        quant.encode_into(x, c, a, signed=False)
    if u is not None:
        for x, c, a in zip(u, bucket.max_exp_avg_sqs, bucket.max_exp_avg_sq_absmax):
            quant.encode_into(x, c, a, signed=False)


def step_with(backend, bucket: Bucket, *, rule: Rule, scalars: StepScalars) -> None:
    """One step with a backend that updates 8-bit codes itself (:mod:`.fused`, :mod:`.compiled`)."""
    if not bucket.quantized:
        _full(backend.adam_update, bucket, rule=rule, scalars=scalars)
        return
    backend.adam_update_8bit(
        bucket.params,
        bucket.grads,
        bucket.exp_avgs,
        bucket.exp_avg_sqs,
        bucket.max_exp_avg_sqs,
        bucket.exp_avg_absmax,
        bucket.exp_avg_sq_absmax,
        bucket.max_exp_avg_sq_absmax,
        rule=rule,
        scalars=scalars,
    )


def _full(update, bucket: Bucket, *, rule: Rule, scalars: StepScalars) -> None:
    """A full-precision bucket through any implementation's ``adam_update``."""
    update(
        bucket.params,
        bucket.grads,
        bucket.exp_avgs,
        bucket.exp_avg_sqs,
        bucket.max_exp_avg_sqs,
        rule=rule,
        scalars=scalars,
    )
