"""One optimizer step, side by side: shardwise vs torch, DeepSpeed, bitsandbytes and torchao.

What is measured: the wall time of ``opt.step()`` on N fp32 parameters (default 16 x 1024x1024 =
16.8M, the shape of DESIGN.md's table) with 2 threads, and the optimizer state each one holds
(bytes per parameter). All candidates live in ONE process and are timed with interleaved
repetitions (every repetition times every candidate once, in a rotating order). A candidate's
ratio to torch's fused AdamW is the median over rounds of its time divided by torch fused's time in
the same round (a slow stretch of a shared machine hits both), with the min-max of those per-round
ratios; step times are reported as median and min-max.

Why: an optimizer step is memory-bound (fp32 AdamW moves 28 B/param, 8-bit state ~16 B/param), so
the step time and the state size are the two numbers a user chooses an optimizer by.

Candidates: torch.optim.AdamW (for-loop, foreach, fused); DeepSpeedCPUAdam (CPU; its op JIT-builds);
bitsandbytes AdamW8bit and 32-bit AdamW; torchao AdamW8bit / AdamW4bit; every shardwise impl x
variant (adam, adam+amsgrad, radam, adabelief, adabelief+amsgrad) x state_bits (32, 8). An anchor
that is missing or fails is recorded as ``unavailable: <reason>``, never silently dropped.

All candidates share the same parameter and gradient tensors (each keeps its own state): the values
drift by a few lr steps, which does not change the work, and memory stays at ~one model + all states.

    python bench/optim_step.py                       # full size, CPU, 2 threads
    python bench/optim_step.py --device cuda --out bench/results/optim_step_cuda.json
    python bench/optim_step.py --quick --only torch,shardwise   # seconds; what the tests run
"""

from __future__ import annotations

import argparse
import fnmatch
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from common import (
    RESULTS_DIR,
    fmt_x,
    interleaved,
    log,
    machine_facts,
    state_bytes,
    summarize,
    time_ratio,
    unavailable,
    write_json,
)

BASELINE = "torch_fused"
VARIANTS = [("adam", False), ("adam", True), ("radam", False), ("adabelief", False), ("adabelief", True)]
LR, WD = 1e-3, 1e-2


@dataclass
class Candidate:
    name: str
    library: str
    label: str
    make: Callable = field(repr=False)
    impl: str | None = None
    variant: str = "adam"
    amsgrad: bool = False
    state_bits: int = 32


def _torch(foreach: bool, fused: bool):
    return lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WD, foreach=foreach, fused=fused)


def _deepspeed(ps):
    if ps[0].device.type != "cpu":
        raise RuntimeError("DeepSpeedCPUAdam is a CPU optimizer")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(ps, lr=LR, weight_decay=WD, adamw_mode=True)


def _bnb(bits: int):
    def make(ps):
        import bitsandbytes as bnb

        return bnb.optim.AdamW(ps, lr=LR, weight_decay=WD, optim_bits=bits)

    return make


def _torchao(bits: int):
    def make(ps):
        from torchao.optim import AdamW4bit, AdamW8bit

        return (AdamW8bit if bits == 8 else AdamW4bit)(ps, lr=LR, weight_decay=WD)

    return make


def _shardwise(impl: str, variant: str, amsgrad: bool, bits: int):
    def make(ps):
        from shardwise.optim import AdamW

        return AdamW(ps, lr=LR, weight_decay=WD, impl=impl, variant=variant, amsgrad=amsgrad, state_bits=bits)

    return make


def candidates(reference: str) -> list[Candidate]:
    """Every row of the table, anchors first. ``reference``: none | adam | all (the slow spec impl)."""
    cands = [
        Candidate("torch_forloop", "torch", "torch AdamW for-loop", _torch(False, False), "forloop"),
        Candidate("torch_foreach", "torch", "torch AdamW foreach", _torch(True, False), "foreach"),
        Candidate(BASELINE, "torch", "torch AdamW fused", _torch(False, True), "fused"),
        Candidate("deepspeed_cpu_adam", "deepspeed", "DeepSpeedCPUAdam", _deepspeed, "native"),
        Candidate("bnb_adamw32bit", "bitsandbytes", "bitsandbytes AdamW 32-bit", _bnb(32)),
        Candidate("bnb_adamw8bit", "bitsandbytes", "bitsandbytes AdamW8bit", _bnb(8), state_bits=8),
        Candidate("torchao_adamw8bit", "torchao", "torchao AdamW8bit", _torchao(8), state_bits=8),
        Candidate("torchao_adamw4bit", "torchao", "torchao AdamW4bit", _torchao(4), state_bits=4),
    ]
    for impl in ("fused", "foreach", "reference"):
        for variant, amsgrad in VARIANTS:
            plain = variant == "adam" and not amsgrad
            if impl == "reference" and (reference == "none" or (reference == "adam" and not plain)):
                continue
            for bits in (32, 8):
                v = variant + ("+amsgrad" if amsgrad else "")
                cands.append(
                    Candidate(
                        f"shardwise_{impl}_{v.replace('+', '_')}_{bits}bit",
                        "shardwise",
                        f"shardwise {impl} {v} {bits}-bit",
                        _shardwise(impl, variant, amsgrad, bits),
                        impl,
                        variant,
                        amsgrad,
                        bits,
                    )
                )
    return cands


def paired_ratio(doc: dict, a: str, b: str) -> float | None:
    """Step time of row ``a`` over row ``b`` (common.time_ratio); None unless both were measured."""
    rows = {r["name"]: r for r in doc["rows"]}
    ra, rb = rows.get(a, {}), rows.get(b, {})
    return time_ratio(ra, rb) if ra.get("status") == "ok" and rb.get("status") == "ok" else None


def headline(doc: dict) -> list[str]:
    """This result's lines in the README headline (report.py prints them as they are)."""
    if doc["config"]["device"] != "cpu":
        gpu = doc["machine"].get("gpu", "CUDA")
        parts = []
        for name, label in (
            ("shardwise_fused_adam_32bit", "fused 32-bit"),
            ("shardwise_fused_adam_8bit", "8-bit"),
        ):
            r = paired_ratio(doc, name, BASELINE)
            if r:
                parts.append(f"{label} **{fmt_x(r)}**")
        if not parts:
            return []
        size = f" ({doc['config']['params'] / 1e6:.1f}M params)" if doc["config"]["params"] > 2e8 else ""
        return [
            f"- On {gpu}{size}: shardwise AdamW step time vs torch fused AdamW: " + ", ".join(parts) + "."
        ]
    lines = []
    n = f"{doc['config']['params'] / 1e6:.1f}M params, {doc['config']['threads']} CPU threads"
    fused32 = paired_ratio(doc, "shardwise_fused_adam_32bit", BASELINE)
    fused8 = paired_ratio(doc, "shardwise_fused_adam_8bit", BASELINE)
    if fused32:
        lines.append(
            f"- Optimizer step, fp32 state: shardwise fused AdamW takes **{fmt_x(fused32)}** the time "
            f"of torch's fused AdamW ({n})."
        )
    if fused8:
        rest = []
        for anchor, label in (
            ("bnb_adamw8bit", "bitsandbytes AdamW8bit"),
            ("torchao_adamw8bit", "torchao AdamW8bit"),
        ):
            r = paired_ratio(doc, anchor, "shardwise_fused_adam_8bit")
            if r and r >= 1:
                rest.append(
                    f"**{r:.0f}x** faster than {label}" if r >= 10 else f"**{fmt_x(r)}** faster than {label}"
                )
            elif r:
                rest.append(f"**{fmt_x(1 / r)}** slower than {label}")
        bpp = {r["name"]: r for r in doc["rows"]}["shardwise_fused_adam_8bit"]["state_bytes_per_param"]
        lines.append(
            f"- 8-bit state ({bpp:.2f} B/param vs 8): **{fmt_x(fused8)}** torch fused fp32 time"
            + (", " + " and ".join(rest) if rest else "")
            + "."
        )
    worst = []
    for bits in (32, 8):
        for r in doc["rows"]:
            if r.get("status") != "ok" or r["library"] != "shardwise":
                continue
            plain = r["variant"] == "adam" and not r["amsgrad"]
            if r["impl"] == "fused" and r["state_bits"] == bits and not plain:
                base = paired_ratio(doc, r["name"], f"shardwise_fused_adam_{bits}bit")
                if base:
                    worst.append(base)
    if worst:
        lines.append(
            f"- Every variant (AMSGrad, RAdam, AdaBelief; 32- and 8-bit): at most **{fmt_x(max(worst))}** "
            "the time of plain AdamW with the same state."
        )
    return lines


def _selected(c: Candidate, only: list[str] | None) -> bool:
    if not only:
        return True
    return any(fnmatch.fnmatch(c.name, pat) or c.library == pat or c.name == pat for pat in only)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=16, help="number of parameter tensors")
    parser.add_argument("--rows", type=int, default=1024, help="each tensor is rows x cols")
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions (interleaved)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (state allocation, JIT)")
    parser.add_argument(
        "--inner",
        type=int,
        default=1,
        help="steps per timed sample (use ~10 on a GPU, where one step is sub-millisecond)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--reference",
        choices=["none", "adam", "all"],
        default="adam",
        help="which shardwise reference-impl rows to time (it is the slow readable spec)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma list of candidate names, globs or libraries (torch, shardwise, ...)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (seconds)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "optim_step.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.tensors, args.rows, args.cols, args.reps, args.warmup = 2, 256, 256, 2, 1
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    only = args.only.split(",") if args.only else None

    g = torch.Generator().manual_seed(0)
    shape = (args.rows, args.cols)
    params = [
        torch.nn.Parameter(torch.randn(shape, generator=g).to(args.device)) for _ in range(args.tensors)
    ]
    for p in params:
        p.grad = (torch.randn(shape, generator=g) * 1e-2).to(args.device)
    n_params = sum(p.numel() for p in params)
    log(
        f"optim_step: {args.tensors} x {args.rows}x{args.cols} fp32 = {n_params / 1e6:.1f}M params on "
        f"{args.device}, {torch.get_num_threads()} threads"
    )

    rows: dict[str, dict] = {}
    opts = {}
    for c in candidates(args.reference):
        if not _selected(c, only) and c.name != BASELINE:
            continue
        row = {k: v for k, v in asdict(c).items() if k != "make"}
        try:
            opts[c.name] = c.make(params)
            row["status"] = "ok"
        except Exception as e:
            row["status"] = unavailable(e)
            log(f"  {c.name}: {row['status']}")
        rows[c.name] = row

    log(f"timing {len(opts)} candidates: {args.warmup} warmup + {args.reps} interleaved rounds")

    def repeat(step):
        def run():
            for _ in range(args.inner):
                step()

        return run

    times = interleaved(
        {n: repeat(o.step) for n, o in opts.items()}, args.reps, args.warmup, args.device, log
    )
    times = {n: (t if n.endswith("!") else [x / args.inner for x in t]) for n, t in times.items()}

    for name, row in rows.items():
        if f"{name}!" in times:
            row["status"] = times[f"{name}!"]
        if row["status"] != "ok":
            continue
        row.update(summarize(times[name]))
        row["times_ms"] = [1e3 * t for t in times[name]]  # per round, for paired ratios
        row["state_bytes"] = state_bytes(opts[name])
        row["state_bytes_per_param"] = row["state_bytes"] / n_params
    base = rows[BASELINE]
    if base["status"] == "ok":
        for name, row in rows.items():
            if row["status"] != "ok":
                continue
            paired = [a / b for a, b in zip(times[name], times[BASELINE], strict=True)]
            row["ratio"] = statistics.median(paired)
            row["ratio_min"], row["ratio_max"] = min(paired), max(paired)

    log(f"\n{'candidate':<44} {'ratio':>7} {'median ms':>10} {'min-max ms':>17} {'B/param':>8}")
    for row in rows.values():
        if row["status"] != "ok":
            log(f"{row['label']:<44} {row['status']}")
            continue
        log(
            f"{row['label']:<44} {row.get('ratio', float('nan')):>7.2f} {row['median_ms']:>10.2f} "
            f"{row['min_ms']:>8.2f}-{row['max_ms']:<8.2f} {row['state_bytes_per_param']:>8.3f}"
        )

    payload = {
        "benchmark": "optim_step",
        "machine": machine_facts(args.device),
        "config": {
            "tensors": args.tensors,
            "shape": list(shape),
            "params": n_params,
            "dtype": "float32",
            "device": args.device,
            "threads": torch.get_num_threads(),
            "reps": args.reps,
            "warmup": args.warmup,
            "inner_steps": args.inner,
            "ratio": "median of per-round paired ratios",
            "quick": args.quick,
            "lr": LR,
            "weight_decay": WD,
        },
        "baseline": BASELINE,
        "rows": list(rows.values()),
    }
    payload["headline"] = headline(payload)
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
