"""CPU offload: host memory per parameter and the offloaded step's time, vs DeepSpeed and torch.

What is measured, per parameter set (16 x 1024x1024 = 16.8M params, and SmolLM2-135M's shapes):

* ``torch_fused``: torch AdamW (fused) on the "device" parameters, nothing offloaded: the baseline
  every ratio is taken against, measured in the same run.
* ``shardwise_{32,8}bit``: shardwise AdamW, not offloaded (the step without any copies).
* ``offload_{32,8}bit``: ``shardwise.optim.CPUOffloadOptimizer`` (inner shardwise AdamW, fused CPU
  kernel): gradients to host buffers, the inner step on the fp32 masters, masters back to the
  parameters. ``_bf16``: bf16 device parameters and gradients (fp32 masters on the host).
* ``deepspeed_cpu_adam``: ``DeepSpeedCPUAdam`` stepping fp32 host parameters: the host half of
  DeepSpeed's ZeRO-Offload; ``deepspeed_cpu_adam_offload`` adds the same copies the wrapper makes
  (gradients into an fp32 host buffer, parameters back), as ZeRO-Offload moves them.

Host bytes / param are measured from the tensors each candidate holds on the host (masters,
transfer buffers, state; pinned slabs counted whole); device bytes / param are the parameters,
gradients and (not offloaded) the optimizer state. There is no GPU here: the "device" is this CPU,
so every copy is a memcpy rather than a PCIe transfer (docs/offload.md says what that leaves
untested). Each offloaded candidate has its own device parameters (it owns their values); the
others share one set. The wrapper copies every gradient at each step (no ``overlap_backward``).

    python bench/offload.py                 # both sets, 2 threads
    python bench/offload.py --quick         # tiny sizes (seconds)
    python bench/offload.py --sets dense    # only 16 x 1024x1024
    python bench/offload.py --device cuda --out bench/results/offload_cuda.json   # on a GPU (untested)
"""

from __future__ import annotations

import argparse
import gc
import os
from collections.abc import Callable

import torch
from common import (
    RESULTS_DIR,
    interleaved,
    log,
    machine_facts,
    peak_rss_bytes,
    summarize,
    unavailable,
    write_json,
)

BASELINE = "torch_fused"
LR, WD = 1e-3, 1e-2
LABELS = {
    "torch_fused": "torch AdamW fused (not offloaded)",
    "shardwise_32bit": "shardwise AdamW 32-bit (not offloaded)",
    "shardwise_8bit": "shardwise AdamW 8-bit (not offloaded)",
    "deepspeed_cpu_adam": "DeepSpeedCPUAdam, host step only",
    "deepspeed_cpu_adam_offload": "DeepSpeedCPUAdam + copies (ZeRO-Offload's data movement)",
    "offload_32bit": "CPUOffloadOptimizer, 32-bit state",
    "offload_8bit": "CPUOffloadOptimizer, 8-bit state",
    "offload_32bit_bf16": "CPUOffloadOptimizer, 32-bit state, bf16 params",
    "offload_8bit_bf16": "CPUOffloadOptimizer, 8-bit state, bf16 params",
}


def smollm2_shapes(quick: bool) -> list[tuple[int, ...]]:
    """SmolLM2-135M's parameter shapes (tied embedding; bench/common.py's SMOLLM2_135M config)."""
    from common import SMOLLM2_135M as c
    from common import TINY_LLAMA

    if quick:
        c = TINY_LLAMA
    h, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    layer = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter), (h,), (h,)]
    return [(vocab, h)] + layer * c["num_hidden_layers"] + [(h,)]


def dense_shapes(quick: bool) -> list[tuple[int, ...]]:
    return [(256, 256)] * 2 if quick else [(1024, 1024)] * 16


DEVICE = "cpu"  # --device: where the "device" parameters and gradients live


def _device_params(shapes, dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g).to(DEVICE, dtype))
        p.grad = (torch.randn(s, generator=g) * 1e-2).to(DEVICE, dtype)
        params.append(p)
    return params


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _deepspeed(shared: list[torch.nn.Parameter], cache: dict) -> dict:
    """DeepSpeedCPUAdam on fp32 host copies of ``shared`` with host fp32 gradient buffers: built once,
    stepped by both DeepSpeed rows (its first use JIT-builds the cpu_adam op, ~2 minutes)."""
    if "deepspeed" not in cache:
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            pin = DEVICE.startswith("cuda")  # ZeRO-Offload pins its host buffers
            masters = [
                torch.nn.Parameter(p.detach().cpu().pin_memory() if pin else p.detach().clone())
                for p in shared
            ]
            bufs = [torch.empty(p.shape, dtype=p.dtype, pin_memory=pin) for p in shared]
            for m, b in zip(masters, bufs):
                m.grad = b
                b.copy_(m)
            opt = DeepSpeedCPUAdam(masters, lr=LR, weight_decay=WD, adamw_mode=True)
            cache["deepspeed"] = {"opt": opt, "masters": masters, "bufs": bufs}
        except Exception as e:
            cache["deepspeed"] = e
    if isinstance(cache["deepspeed"], Exception):
        raise cache["deepspeed"]
    return cache["deepspeed"]


def build(
    name: str, shared: list[torch.nn.Parameter], shapes, cache: dict
) -> tuple[Callable[[], None], dict]:
    """One candidate: its step function and what its memory is measured from."""
    from shardwise.optim import AdamW, CPUOffloadOptimizer

    if name == "torch_fused":
        opt = torch.optim.AdamW(shared, lr=LR, weight_decay=WD, fused=True)
        return opt.step, {"opt": opt, "host": lambda: 0, "device_state": True}
    if name.startswith("shardwise_"):
        opt = AdamW(shared, lr=LR, weight_decay=WD, state_bits=int(name.split("_")[1][:-3]))
        return opt.step, {"opt": opt, "host": lambda: 0, "device_state": True}
    if name.startswith("deepspeed"):
        ds = _deepspeed(shared, cache)
        opt, masters, bufs = ds["opt"], ds["masters"], ds["bufs"]
        info = {"opt": opt, "host": lambda: _nbytes(masters) + _nbytes(bufs) + _state_bytes(opt)}
        if name == "deepspeed_cpu_adam":
            return opt.step, info
        grads, params = [p.grad for p in shared], list(shared)

        def offloaded():
            if DEVICE == "cpu":
                torch._foreach_copy_(bufs, grads)
            else:
                for b, g in zip(bufs, grads):
                    b.copy_(g, non_blocking=True)
                torch.cuda.synchronize()
            opt.step()
            with torch.no_grad():
                if DEVICE == "cpu":
                    torch._foreach_copy_(params, masters)
                else:
                    for p, m in zip(params, masters):
                        p.copy_(m, non_blocking=True)

        return offloaded, info
    # CPUOffloadOptimizer: its own device parameters (it owns their values between steps)
    bits = int(name.split("_")[1][:-3])
    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    params = _device_params(shapes, dtype)
    opt = CPUOffloadOptimizer(params, AdamW, lr=LR, weight_decay=WD, state_bits=bits)
    return opt.step, {"opt": opt, "host": lambda: opt.host_bytes()["allocated"], "params": params}


def _state_bytes(opt) -> int:
    return sum(
        v.numel() * v.element_size()
        for st in opt.state.values()
        for k, v in st.items()
        if k != "step" and torch.is_tensor(v)
    )


def run_set(set_name: str, shapes, names: list[str], args) -> dict:
    n = sum(torch.Size(s).numel() for s in shapes)
    log(f"\n== {set_name}: {len(shapes)} tensors, {n / 1e6:.1f}M params, {torch.get_num_threads()} threads")
    shared = _device_params(shapes, torch.float32)
    steps, infos, rows, cache = {}, {}, {}, {}
    for name in names:
        row = {"name": name, "label": LABELS[name]}
        try:
            steps[name], infos[name] = build(name, shared, shapes, cache)
            row["status"] = "ok"
        except Exception as e:  # an anchor that cannot run here is recorded, not fatal
            row["status"] = unavailable(e)
            log(f"  {name}: {row['status']}")
        rows[name] = row
    log(f"timing {len(steps)} candidates: {args.warmup} warmup + {args.reps} interleaved rounds")
    times = interleaved(steps, args.reps, args.warmup, DEVICE, log)
    for name, row in rows.items():
        if f"{name}!" in times:
            row["status"] = times[f"{name}!"]
        if row["status"] != "ok":
            continue
        info = infos[name]
        row.update(summarize(times[name]))
        host = info["host"]()
        params = info.get("params", shared)
        device = _nbytes(params) + _nbytes([p.grad for p in params])
        if info.get("device_state"):  # not offloaded: the state is device memory
            opt = info["opt"]
            device += opt.state_bytes() if hasattr(opt, "state_bytes") else _state_bytes(opt)
        row["host_bytes_per_param"] = host / n
        row["device_bytes_per_param"] = device / n
        if hasattr(info["opt"], "host_bytes"):
            row["host_bytes"] = info["opt"].host_bytes()
    base = rows.get(BASELINE, {})
    ds = rows.get("deepspeed_cpu_adam_offload", {})
    for name, row in rows.items():
        if row["status"] != "ok":
            continue
        for key, ref in (("ratio", base), ("ratio_vs_deepspeed", ds)):
            if ref.get("status") == "ok":
                row[key] = row["median_ms"] / ref["median_ms"]
                paired = sorted(a / b for a, b in zip(times[name], times[ref["name"]]))
                row[f"{key}_min"], row[f"{key}_max"] = paired[0], paired[-1]
    log(f"{'candidate':<58} {'ratio':>6} {'vs DS':>6} {'median ms':>10} {'host B/p':>9} {'dev B/p':>8}")
    for row in rows.values():
        if row["status"] != "ok":
            log(f"{row['label']:<58} {row['status']}")
            continue
        log(
            f"{row['label']:<58} {row.get('ratio', float('nan')):>6.2f} "
            f"{row.get('ratio_vs_deepspeed', float('nan')):>6.2f} {row['median_ms']:>10.1f} "
            f"{row['host_bytes_per_param']:>9.2f} {row['device_bytes_per_param']:>8.2f}"
        )
    result = {"name": set_name, "tensors": len(shapes), "params": n, "rows": list(rows.values())}
    del steps, infos, cache, shared
    gc.collect()
    return result


def headline(doc: dict) -> list[str]:
    """This result's README line (report.py prints it as it is): memory only, since without an
    accelerator the copies are memcpys and the step time says little about a GPU run."""
    sets = {s["name"]: s for s in doc["sets"]}
    s = sets.get("smollm2_135m") or sets.get("dense")
    if not s:
        return []
    rows = {r["name"]: r for r in s["rows"] if r["status"] == "ok"}
    o8, o32 = rows.get("offload_8bit"), rows.get("offload_32bit")
    if not (o8 and o32):
        return []
    return [
        f"- CPU offload ({s['params'] / 1e6:.0f}M params): device memory "
        f"**{o32['device_bytes_per_param']:.0f}** B/param (fp32 params + grads, no optimizer state); "
        f"host **{o32['host_bytes_per_param']:.1f}** "
        f"B/param with 32-bit state, **{o8['host_bytes_per_param']:.1f}** with 8-bit (DeepSpeed "
        "ZeRO-Offload's CPU Adam: 16)."
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="dense,smollm2_135m", help="comma list: dense, smollm2_135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--device", default="cpu", help="where the model's parameters live (cuda: real D2H / H2D copies)"
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (seconds)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "offload.json"))
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if args.quick:
        args.reps, args.warmup = 2, 1
    torch.set_num_threads(args.threads)
    everything = list(LABELS)
    # the large set keeps to the rows that answer its question (memory: ~10 GB at 135M params)
    lean = [
        "torch_fused",
        "deepspeed_cpu_adam",
        "deepspeed_cpu_adam_offload",
        "offload_32bit",
        "offload_8bit",
    ]
    plan = {"dense": (dense_shapes, everything), "smollm2_135m": (smollm2_shapes, lean)}
    load_before = os.getloadavg()
    sets = []
    for name in args.sets.split(","):
        shapes_of, names = plan[name]
        sets.append(run_set(name, shapes_of(args.quick), names, args))
    payload = {
        "benchmark": "offload",
        "machine": machine_facts(args.device),
        "config": {
            "threads": torch.get_num_threads(),
            "reps": args.reps,
            "warmup": args.warmup,
            "quick": args.quick,
            "lr": LR,
            "weight_decay": WD,
            "device": args.device
            + (
                " (no accelerator: the device parameters are host tensors too)"
                if args.device == "cpu"
                else ""
            ),
        },
        "baseline": BASELINE,
        "sets": sets,
        "peak_rss_bytes": peak_rss_bytes(),
        # 1/5/15-minute load averages: timings taken on a loaded machine say so
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    payload["headline"] = headline(payload)
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
