"""Fused implementation: one native kernel per bucket.

On CPU the kernel is C++ (``csrc/adam_fused.cpp``), compiled once per machine with
``torch.utils.cpp_extension`` (about a minute; cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``, keyed by source, flags, CPU, torch and Python ABI, never by the
checkout's path: see :func:`build_name`) and threaded with ATen's pool. It is feature-detected: without a C++
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


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build_name(source: str | None = None) -> str:
    """The extension's name, which is also its cache folder: a digest of everything the binary
    depends on (the kernel source, the compiler flags, this CPU's features for ``-march``, torch's
    version and C++ ABI, the Python ABI, the compiler) and of nothing else. In particular not of
    the checkout's path: every clone, worktree or installed copy of the same source shares one
    build."""
    source = _SOURCE.read_text() if source is None else source
    parts = [
        source,
        " ".join(_CFLAGS),
        _cpu_flags(),
        torch.__version__,
        f"cxx11abi={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        sys.implementation.cache_tag,
        sys.abiflags,
        os.environ.get("CXX", "c++"),
    ]
    return f"shardwise_adam_fused_{hashlib.sha1(chr(0).join(parts).encode()).hexdigest()[:12]}"


_BUILT = "shardwise-built"  # written into the build folder once the module has loaded


def _load_or_build():
    """Import the cached build if one exists, else build it from a copy of the source kept in
    the build folder (so neither the cache key nor ninja's command line names the checkout)."""
    from torch.utils.cpp_extension import _get_build_directory, _import_module_from_library, load

    name = build_name()
    folder = Path(_get_build_directory(name, verbose=False))
    if (folder / _BUILT).exists():
        try:
            return _import_module_from_library(name, str(folder), True)
        except Exception:  # a damaged cache: rebuild below
            pass
    source = folder / _SOURCE.name
    text = _SOURCE.read_text()
    if not source.exists() or source.read_text() != text:  # unchanged mtime: ninja stays quiet
        tmp = folder / f".{_SOURCE.name}.{os.getpid()}"
        tmp.write_text(text)
        tmp.replace(source)  # atomic: a concurrent builder never reads half a file
    print(f"shardwise: building fused CPU kernel {name} (once per machine and version)", file=sys.stderr)
    module = load(
        name=name,
        sources=[str(source)],
        extra_cflags=_CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(folder),
        verbose=False,
    )
    (folder / _BUILT).write_text(f"{name}\n")
    return module


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
            _module = _load_or_build()
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
