"""Fused implementation: one native kernel per bucket.

On CPU the kernel is C++ (``csrc/adam_fused.cpp``), compiled once per machine with
``torch.utils.cpp_extension`` (about a minute; cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) and threaded with ATen's pool. It is feature-detected: without a C++
compiler, or with ``SHARDWISE_DISABLE_NATIVE=1``, :func:`available` is False, ``impl="auto"`` picks
``foreach`` and ``impl="fused"`` warns once and does the same.

On other devices (CUDA) ``impl="fused"`` runs :mod:`.compiled` instead, the rule and codec compiled
by ``torch.compile``; ``"auto"`` stays on ``foreach`` there until that path has been measured on a
GPU.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
from pathlib import Path

import torch
from torch import Tensor

from ..rule import Rule, StepScalars

_SOURCE = Path(__file__).with_name("csrc") / "adam_fused.cpp"
# -ffp-contract=off: no FMA contraction, so the kernel rounds like the reference's separate ops.
# -fno-math-errno: lets sqrt vectorize. The flags are part of the build's cache key.
# SHARDWISE_MARCH picks the target (default: this CPU); e.g. x86-64-v3 for an image that must run on
# any AVX2 machine. The kernel has AVX-512, AVX2 and portable code paths.
_MARCH = os.environ.get("SHARDWISE_MARCH", "native")
_CFLAGS = ["-O3", f"-march={_MARCH}", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
_lock = threading.Lock()
_module = None
_error: str | None = None


def _cpu_fingerprint() -> str:
    """The extension is built for this CPU (-march): key the build by CPU flags, flags and source."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        flags = platform.processor()
    key = flags + _SOURCE.read_text() + " ".join(_CFLAGS) + torch.__version__
    digest = hashlib.sha1(key.encode()).hexdigest()
    return digest[:12]


def _native():
    """The compiled CPU module, building it on first use; None if it cannot be built."""
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    with _lock:
        if _module is not None or _error is not None:
            return _module
        if os.environ.get("SHARDWISE_DISABLE_NATIVE") == "1":
            _error = "disabled by SHARDWISE_DISABLE_NATIVE=1"
            return None
        try:
            from torch.utils.cpp_extension import load

            name = f"shardwise_adam_fused_{_cpu_fingerprint()}"
            print(f"shardwise: loading fused CPU kernel {name} (built once per machine)", file=sys.stderr)
            _module = load(
                name=name,
                sources=[str(_SOURCE)],
                extra_cflags=_CFLAGS,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as exc:  # no compiler, no headers, ...: fall back, say why
            lines = str(exc).splitlines()
            first_error = next((ln.strip() for ln in lines if "error:" in ln), lines[-1] if lines else "")
            _error = f"build failed: {first_error}"
    return _module


def available(device: torch.device) -> bool:
    """Whether ``auto`` should use the fused kernel on ``device``."""
    return device.type == "cpu" and _native() is not None


def why_unavailable(device: torch.device) -> str:
    if device.type != "cpu":
        return f"no native kernel for {device.type}; the compiled path is used only with impl='fused'"
    _native()
    return _error or "available"


def _flat(*tensors: Tensor) -> tuple:
    return tuple(t.contiguous() for t in tensors)


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
    """Full-precision state; same signature as the reference and foreach implementations."""
    params[0].device.type == "cpu" or _raise_not_cpu(params[0].device)
    _checked_contiguous(params, grads)
    _native().adam_fused_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs or [],
        *_rule_args(rule, scalars),
    )


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
    """8-bit state: codes and per-block absmax updated in place, one pass over memory."""
    _checked_contiguous(params, grads)
    _native().adam_fused_8bit_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs or [],
        exp_avg_absmax,
        exp_avg_sq_absmax,
        max_exp_avg_sq_absmax or [],
        *_rule_args(rule, scalars),
    )


def _rule_args(rule: Rule, s: StepScalars) -> tuple:
    """The flags and per-step scalars both native entry points take, in their C++ order."""
    return (
        rule.decoupled,
        rule.belief,
        rule.amsgrad,
        -s.grad_scale if rule.maximize else s.grad_scale,  # the gradient's factor: sign and 1/scale
        s.beta1,
        s.beta2,
        s.weight_decay,
        s.decay_factor,
        s.eps,
        s.step_size,
        s.denom_scale,
        s.denom_eps,
    )


def _checked_contiguous(params: list[Tensor], grads: list[Tensor]) -> None:
    for i, (p, g) in enumerate(zip(params, grads)):
        if not p.is_contiguous():
            raise RuntimeError(
                "impl='fused' needs contiguous parameters; use impl='foreach' for strided ones"
            )
        if not g.is_contiguous() or g.dtype != p.dtype:
            grads[i] = g.contiguous().to(p.dtype)


def _raise_not_cpu(device: torch.device) -> bool:
    raise RuntimeError(f"the native fused kernel runs on CPU, got {device}")
