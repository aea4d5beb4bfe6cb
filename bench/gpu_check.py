"""Correctness of shardwise's fused path on a device, before anything is timed there.

Two checks, each against ``impl="reference"`` (the per-tensor spec) on the same device, the same
start values and the same fresh random gradients every step (never zeros):

* ``backend``: the compiled fused backend (:mod:`shardwise.optim.kernels.compiled`, what
  ``impl="fused"`` runs off CPU) called directly on one bucket, for every variant (AdamW, +AMSGrad,
  RAdam, AdaBelief, AdaBelief+AMSGrad, and Adam with L2 decay and ``maximize``), 32- and 8-bit
  state, over ``--steps`` steps (RAdam crosses from its SGD phase into its adaptive one at step 6).
  Rows end in a partial 256-element block. Each rule starts from a fresh Dynamo cache, and the
  check records how many graphs were compiled (0 would mean the compiled path did not run);
* ``public``: ``shardwise.optim.AdamW(impl="fused")`` vs ``AdamW(impl="reference")`` on a
  model-like parameter list (a large and a small matrix, a vector), 32- and 8-bit: the dispatch a
  user gets, mixed 8-bit and 32-bit buckets included. On CUDA, a fallback warning is a failure.

Pass rules (METHOD.md's "correct first"): 32-bit state, relative L2 error of parameters and moments
``<= 1e-5``; 8-bit state, parameters ``<= 1e-3`` (a code that rounds the other way moves a
parameter by one quantization step), codes differ by at most 1 and agree on >= 99.9% of
elements, per-block scales within ``1e-4`` relative. NaN never passes.

    python bench/gpu_check.py --device cuda          # every variant (bench/gpu.sh runs this first)
    python bench/gpu_check.py --device cpu --quick   # two variants, CPU Inductor (the dry run)
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from common import RESULTS_DIR, log, machine_facts, unavailable, write_json

RULES = [  # (name, variant, amsgrad, decoupled, maximize)
    ("adamw", "adam", False, True, False),
    ("adamw_amsgrad", "adam", True, True, False),
    ("radam_decoupled", "radam", False, True, False),
    ("adabelief_decoupled", "adabelief", False, True, False),
    ("adabelief_amsgrad_decoupled", "adabelief", True, True, False),
    ("adam_l2_maximize", "adam", False, False, True),
]
QUICK_RULES = ("adamw", "adabelief_amsgrad_decoupled")
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
FULL_TOL, PARAM_8BIT_TOL, SCALE_TOL, CODE_AGREE = 1e-5, 1e-3, 1e-4, 0.999


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _codes(a: torch.Tensor, b: torch.Tensor) -> dict:
    diff = (a.int() - b.int()).abs()
    return {"max_code_diff": int(diff.max()), "codes_equal": float((diff == 0).float().mean())}


def _verdict(metrics: dict, bits: int) -> bool:
    """Whether every metric is within its tolerance (module docstring); NaN never passes."""
    for key, value in metrics.items():
        if value != value:
            return False
        if key.endswith("_scale"):
            bad = value > SCALE_TOL
        elif key == "rel_param":
            bad = value > (FULL_TOL if bits == 32 else PARAM_8BIT_TOL)
        elif key.startswith("rel_"):  # 32-bit moments (also the small parameters' in 8-bit mode)
            bad = value > FULL_TOL
        elif key.endswith("max_code_diff"):
            bad = value > 1
        elif key.endswith("codes_equal"):
            bad = value < CODE_AGREE
        else:
            bad = False
        if bad:
            return False
    return True


def _bucket(params: list[torch.Tensor], bits: int):
    from shardwise.optim import quant
    from shardwise.optim.kernels import Bucket

    grads = [torch.empty_like(p) for p in params]
    if bits == 32:
        zeros = lambda: [torch.zeros_like(p) for p in params]
        return Bucket(params, grads, zeros(), zeros(), zeros())
    codes = lambda dtype: [torch.zeros(p.shape, dtype=dtype, device=p.device) for p in params]
    scales = lambda: [torch.zeros(quant.scales_shape(p.shape), device=p.device) for p in params]
    return Bucket(
        params, grads, codes(torch.int8), codes(torch.uint8), codes(torch.uint8), scales(), scales(), scales()
    )


def check_backend(rule_row: tuple, bits: int, device: str, shape: tuple[int, int], steps: int) -> dict:
    """The compiled backend on one bucket vs the reference implementation, ``steps`` steps."""
    from shardwise.optim.kernels import compiled, run, step_with
    from shardwise.optim.rule import Rule, step_scalars

    name, variant, amsgrad, decoupled, maximize = rule_row
    rule = Rule(variant=variant, amsgrad=amsgrad, decoupled=decoupled, maximize=maximize)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    g = torch.Generator(device=device).manual_seed(1000 * [r[0] for r in RULES].index(name) + bits)
    start = [torch.randn(shape, generator=g, device=device) for _ in range(2)]
    ours = _bucket([s.clone() for s in start], bits)
    ref = _bucket([s.clone() for s in start], bits)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        for i in range(len(start)):
            grad = torch.randn(shape, generator=g, device=device)
            ours.grads[i].copy_(grad)
            ref.grads[i].copy_(grad)
        scalars = step_scalars(rule, step, **HYPER)
        step_with(compiled, ours, rule=rule, scalars=scalars)
        run("reference", ref, rule=rule, scalars=scalars)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    m = {"rel_param": max(_rel(a, b) for a, b in zip(ours.params, ref.params))}
    states = [("exp_avgs", "exp_avg_absmax"), ("exp_avg_sqs", "exp_avg_sq_absmax")]
    if amsgrad:
        states.append(("max_exp_avg_sqs", "max_exp_avg_sq_absmax"))
    for key, scale in states:
        ours_s, ref_s = getattr(ours, key), getattr(ref, key)
        if bits == 32:
            m[f"rel_{key}"] = max(_rel(a, b) for a, b in zip(ours_s, ref_s))
            continue
        codes = [_codes(a, b) for a, b in zip(ours_s, ref_s)]
        m[f"{key}_max_code_diff"] = max(c["max_code_diff"] for c in codes)
        m[f"{key}_codes_equal"] = min(c["codes_equal"] for c in codes)
        m[f"rel_{key}_scale"] = max(_rel(a, b) for a, b in zip(getattr(ours, scale), getattr(ref, scale)))
    ok = _verdict(m, bits) and graphs >= 1
    return {
        "check": "backend",
        "rule": name,
        "state_bits": bits,
        "shape": list(shape),
        "steps": steps,
        "graphs_compiled": graphs,
        "seconds": round(time.perf_counter() - t0, 1),
        **m,
        "status": "pass" if ok else ("fail: no graph compiled" if graphs < 1 else "fail"),
    }


def check_public(bits: int, device: str, steps: int) -> dict:
    """AdamW(impl="fused") vs AdamW(impl="reference") on a model-like list of parameters."""
    from shardwise.optim import AdamW

    torch._dynamo.reset()
    g = torch.Generator(device=device).manual_seed(bits)
    shapes = [(257, 300), (40, 50), (300,)]  # 8-bit-eligible, too small for 8-bit, 1-D
    start = [torch.randn(s, generator=g, device=device) for s in shapes]
    ours = [torch.nn.Parameter(s.clone()) for s in start]
    ref = [torch.nn.Parameter(s.clone()) for s in start]
    kw = dict(lr=1e-2, weight_decay=0.1, state_bits=bits)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt, opt_ref = AdamW(ours, impl="fused", **kw), AdamW(ref, impl="reference", **kw)
        for _ in range(steps):
            for a, b in zip(ours, ref):
                a.grad = torch.randn(a.shape, generator=g, device=device)
                b.grad = a.grad.clone()
            opt.step()
            opt_ref.step()
    fallback = [str(w.message) for w in caught if "'foreach'" in str(w.message)]
    m = {"rel_param": max(_rel(a, b) for a, b in zip(ours, ref))}
    for key in ("exp_avg", "exp_avg_sq"):
        for i, (a, b) in enumerate(zip(ours, ref)):
            sa, sb = opt.state[a][key], opt_ref.state[b][key]
            if sa.dtype.is_floating_point:
                m[f"rel_{key}_{i}"] = _rel(sa, sb)
            else:
                c = _codes(sa, sb)
                m[f"{key}_{i}_max_code_diff"], m[f"{key}_{i}_codes_equal"] = (
                    c["max_code_diff"],
                    c["codes_equal"],
                )
    ok = _verdict(m, bits) and not (device.startswith("cuda") and fallback)
    return {
        "check": "public",
        "rule": "adamw",
        "state_bits": bits,
        "shapes": [list(s) for s in shapes],
        "steps": steps,
        "seconds": round(time.perf_counter() - t0, 1),
        "fallback_warnings": fallback,
        **m,
        "status": "pass" if ok else "fail",
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=1031, help="rows of the checked matrices (x 300)")
    parser.add_argument("--quick", action="store_true", help="two variants, small matrices (the dry run)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "gpu_check.json"))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device (use --device cpu for the dry run)")
    rules = [r for r in RULES if not args.quick or r[0] in QUICK_RULES]
    shape = (57 if args.quick else args.rows, 300)  # 300 columns: every row ends in a partial block
    rows: list[dict] = []

    def save() -> dict:
        payload = {
            "benchmark": "gpu_check",
            "machine": machine_facts(args.device),
            "config": {"device": args.device, "steps": args.steps, "shape": list(shape), "quick": args.quick},
            "tolerances": {
                "rel_32bit": FULL_TOL,
                "rel_param_8bit": PARAM_8BIT_TOL,
                "rel_scale_8bit": SCALE_TOL,
                "codes_equal_8bit": CODE_AGREE,
                "max_code_diff_8bit": 1,
            },
            "complete": len(rows) == 2 * len(rules) + 2,
            "passed": len(rows) == 2 * len(rules) + 2 and all(r["status"] == "pass" for r in rows),
            "rows": rows,
            "headline": [],  # a check, not a measurement
        }
        write_json(args.out, payload)
        return payload

    for rule_row in rules:
        for bits in (32, 8):
            try:
                row = check_backend(rule_row, bits, args.device, shape, args.steps)
            except Exception as e:
                row = {"check": "backend", "rule": rule_row[0], "state_bits": bits, "status": unavailable(e)}
            rows.append(row)
            save()
            log(f"  backend {row['rule']:<28} {bits:>2}-bit  {row['status']}  ({row.get('seconds', '?')} s)")
    for bits in (32, 8):
        try:
            row = check_public(bits, args.device, args.steps)
        except Exception as e:
            row = {"check": "public", "rule": "adamw", "state_bits": bits, "status": unavailable(e)}
        rows.append(row)
        log(f"  public  AdamW(impl='fused')          {bits:>2}-bit  {row['status']}")
    payload = save()
    n_pass = sum(r["status"] == "pass" for r in rows)
    log(f"gpu_check: {'all passed' if payload['passed'] else 'FAILED'} ({n_pass}/{len(rows)} checks)")
    return payload


if __name__ == "__main__":
    raise SystemExit(0 if main()["passed"] else 1)
