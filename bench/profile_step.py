"""Where a training step's time goes, per optimizer: torch.profiler over bench/e2e.py's plain loop.

For each optimizer (torch fused AdamW, shardwise AdamW 32- and 8-bit, or ``--only``: e2e.py's loop
names, or ``recipe_shardwise_{32,8}bit``: AdamW as the recipes build it, with decay / no-decay
param groups and ``skip_nonfinite=True``), on one of
e2e.py's cases: a few untimed steps, then ``--steps`` profiled steps with each phase in its own
``record_function`` range (forward, backward, clip_grad_norm, opt.step, zero_grad). Printed, per
optimizer: each phase's share of the step's CPU time; inside ``opt.step``, the number of operator
calls per step, host syncs (``aten::item`` / ``_local_scalar_dense``) and the operators with the
largest self-CPU share. Shares and counts, not wall-clock claims: on a loaded machine the absolute
times move, the shares and counts much less. Nothing is written to bench/results.

    python bench/profile_step.py [--case minilm] [--steps 3] [--only loop_torch_fused,loop_shardwise_32bit]
    python bench/profile_step.py --quick     # tiny model, seconds
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import torch
from common import log
from e2e import BASELINE, QUICK_SHAPES, SHAPES, _Data, _model, _optimizer

PHASES = ("forward", "backward", "clip_grad_norm", "opt.step", "zero_grad")
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense")


def _step(model, opt, ids, labels):
    from torch.profiler import record_function

    with record_function("forward"):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    with record_function("backward"):
        loss.backward()
    with record_function("clip_grad_norm"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    with record_function("opt.step"):
        opt.step()
    with record_function("zero_grad"):
        opt.zero_grad(set_to_none=True)


def _inside(event, name: str) -> bool:
    p = event.cpu_parent
    while p is not None:
        if p.name == name:
            return True
        p = p.cpu_parent
    return False


def _cprofile_step(model, opt, ids, labels, args) -> list[dict]:
    """cProfile over ``opt.step()`` alone: which Python functions (and native calls) take its time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    for _ in range(args.steps):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
        prof.enable()
        opt.step()
        prof.disable()
        opt.zero_grad(set_to_none=True)
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values())  # tottime: time in the function itself
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[: args.top]
    return [
        {
            "function": f"{Path(f).name}:{line}({fn})" if f != "~" else fn,
            "tottime_share": v[2] / total,
            "calls_per_step": v[1] / args.steps,
        }
        for (f, line, fn), v in rows
    ]


def profile(name: str, case: str, args) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model, source = _model(case, args)
    model.train()
    bs, seq_len, _ = (QUICK_SHAPES if args.quick else SHAPES)[case]
    data = _Data(bs * 4, seq_len, model.config.vocab_size, case == "smollm2")
    ids, labels = data.ids[:bs], data.labels[:bs]
    if name.startswith("recipe_"):  # what the recipes build: decay/no-decay groups, non-finite skip
        from shardwise.optim import AdamW
        from shardwise.optim.param_groups import param_groups

        bits = int(name.split("_")[-1][:-3])
        opt = AdamW(param_groups(model, 0.01), lr=2e-4, state_bits=bits, skip_nonfinite=True)
    else:
        opt = _optimizer(name, model.parameters())
    params = list(model.parameters())
    for _ in range(args.warmup):
        _step(model, opt, ids, labels)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            _step(model, opt, ids, labels)
    events = prof.events()
    phase_us = {p: sum(e.cpu_time_total for e in events if e.name == p) / args.steps for p in PHASES}
    total = sum(phase_us.values())
    in_step = [e for e in events if _inside(e, "opt.step")]
    self_us: dict[str, float] = defaultdict(float)
    calls: Counter = Counter()
    for e in in_step:
        if e.name.startswith("Optimizer."):  # torch's own range around step(): not an operator
            continue
        self_us[e.name] += e.self_cpu_time_total / args.steps
        calls[e.name] += 1
    step_us = phase_us["opt.step"]
    # what no aten operator accounts for: Python, and native code called without the dispatcher
    # (shardwise's C++ kernel is such a call); the cProfile pass below splits the two
    python_us = step_us - sum(self_us.values())
    top = sorted(self_us.items(), key=lambda kv: -kv[1])[: args.top]
    py_top = _cprofile_step(model, opt, ids, labels, args)
    return {
        "name": name,
        "case": case,
        "model": source,
        "tensors": len(params),
        "tensors_1d": sum(p.ndim <= 1 for p in params),
        "tensors_under_4096": sum(p.numel() < 4096 for p in params),
        "phase_share": {p: phase_us[p] / total for p in PHASES},
        "opt_step_share_of_step": step_us / total,
        "opt_step_ops_per_step": sum(calls.values()) / args.steps,
        "opt_step_host_syncs_per_step": sum(calls[o] for o in SYNC_OPS) / args.steps,
        "opt_step_not_in_operators_share": python_us / step_us if step_us else 0.0,
        "opt_step_python_functions": py_top,
        "opt_step_top_ops": [
            {"op": op, "self_share_of_opt_step": us / step_us, "calls_per_step": calls[op] / args.steps}
            for op, us in top
        ],
        # the profiler's own clock, for the ratio between optimizers in this run only
        "step_cpu_us": total,
        "opt_step_cpu_us": step_us,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="minilm", choices=["minilm", "smollm2"])
    parser.add_argument(
        "--only", default=f"{BASELINE},loop_shardwise_32bit,loop_shardwise_8bit,recipe_shardwise_32bit"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    args.random_init = False
    torch.set_num_threads(args.threads)
    rows = [profile(name, args.case, args) for name in args.only.split(",")]
    base = next((r for r in rows if r["name"] == BASELINE), None)
    for r in rows:
        log(f"\n== {r['name']} on {r['model']} ({r['tensors']} tensors, {r['tensors_1d']} 1-D)")
        log("  phase shares: " + ", ".join(f"{p} {s:.1%}" for p, s in r["phase_share"].items()))
        if base:
            log(
                f"  vs {BASELINE} (profiler clock, same run): "
                f"step x{r['step_cpu_us'] / base['step_cpu_us']:.2f}, "
                f"opt.step x{r['opt_step_cpu_us'] / base['opt_step_cpu_us']:.2f}"
            )
        log(
            f"  opt.step: {r['opt_step_ops_per_step']:.0f} operator calls/step, "
            f"{r['opt_step_host_syncs_per_step']:.0f} host syncs/step, "
            f"{r['opt_step_not_in_operators_share']:.1%} of its time outside aten operators"
        )
        for t in r["opt_step_top_ops"]:
            log(
                f"    {t['op']:<44} {t['self_share_of_opt_step']:6.1%}  {t['calls_per_step']:6.0f} calls/step"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
