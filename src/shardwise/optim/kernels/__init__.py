"""Three implementations of :mod:`shardwise.optim.rule`, one keyword-only signature::

    adam_update(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, rule, scalars)

``reference`` loops over tensors (the spec), ``foreach`` uses multi-tensor ops, ``fused`` runs one
native kernel per bucket. :func:`run` is the 8-bit codec seam: for 8-bit buckets the fused kernel
works on codes directly (one pass over memory), the others decode to full precision, apply the
same signature, and re-encode (:mod:`shardwise.optim.quant`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

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

    @classmethod
    def empty(cls, *, amsgrad: bool, quantized: bool) -> Bucket:
        lists = lambda: ([], [], [] if amsgrad else None)
        return cls([], [], *lists(), *(lists() if quantized else ()))

    def add(self, param: Tensor, grad: Tensor, values: list[Tensor], scales: list[Tensor] | None) -> None:
        """One parameter: its moments (values or codes) and, for 8-bit state, their scales, in
        :data:`shardwise.optim.quant.MOMENTS` order."""
        self.params.append(param)
        self.grads.append(grad)
        for dst, t in zip((self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs), values):
            dst.append(t)
        if scales is not None:
            scale_lists = (self.exp_avg_absmax, self.exp_avg_sq_absmax, self.max_exp_avg_sq_absmax)
            for dst, t in zip(scale_lists, scales):
                dst.append(t)


def _fused_backend(device: torch.device):
    """What ``impl="fused"`` means on ``device``: the native C++ kernel on CPU, torch.compile
    elsewhere. The only place that makes this choice."""
    return fused if device.type == "cpu" else compiled


def fused_available(device: torch.device) -> tuple[bool, str]:
    """Whether ``impl="fused"`` runs on ``device``, and why not."""
    backend = _fused_backend(device)
    return backend.available(device), backend.why_unavailable(device)


def resolve(impl: str, device: torch.device, contiguous: bool = True) -> str:
    """The implementation that runs a bucket on ``device`` when the optimizer was built with
    ``impl`` ("auto" included): "auto" takes the native fused kernel where it exists (CPU) and
    ``foreach`` elsewhere (the compiled path is opt-in until measured on a GPU); "fused" falls back
    to ``foreach``, with a warning once, for strided parameters or where it cannot run."""
    if impl == "auto":
        return "fused" if contiguous and device.type == "cpu" and fused.available(device) else "foreach"
    if impl == "fused" and not contiguous:
        _warn_once("shardwise: impl='fused' needs contiguous parameters; strided ones use 'foreach'")
        return "foreach"
    if impl == "fused":
        ok, why = fused_available(device)
        if not ok:
            _warn_once(f"shardwise: fused kernel unavailable on {device.type} ({why}); using 'foreach'")
            return "foreach"
    return impl


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=4)


def run(impl: str, bucket: Bucket, *, rule: Rule, scalars: StepScalars) -> None:
    """Apply one step of ``rule`` to ``bucket`` with a resolved implementation ``impl``."""
    backend = _fused_backend(bucket.params[0].device) if impl == "fused" else None
    if scalars.grad_scale != 1.0 and backend is not fused:
        # Only the native kernel folds GradScaler's 1/scale into its gradient read; the others
        # unscale a copy first (the user's .grad stays as GradScaler left it).
        bucket = replace(bucket, grads=torch._foreach_mul(bucket.grads, scalars.grad_scale))
    if backend is not None:  # works on codes directly
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
