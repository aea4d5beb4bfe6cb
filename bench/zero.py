"""ZeRO benchmark: per-rank optimizer state memory and step time; ZeRO-1 on 1 vs 2 ranks and
DeepSpeed ZeRO-2 (with and without CPU offload, 32- vs 8-bit state) on 2 ranks, in one run.

ZeRO-1 compares, on the same parameters and (DDP-averaged, here synthetic) gradients:

* ``torch_adamw``: plain DDP ``torch.optim.AdamW(foreach=True)``: every rank keeps all the state;
* ``torch_zero``: ``torch.distributed.optim.ZeroRedundancyOptimizer(AdamW)``: whole parameters
  assigned to ranks (its imbalance shows when parameters differ in size);
* ``shardwise``: ``shardwise.optim.AdamW`` unsharded, and with ``shard=True`` (rows of every
  parameter on every rank, bucketed all-gather), 32-bit and 8-bit state.

Step time includes the parameter all-gather of the ZeRO variants.

DeepSpeed ZeRO-2 (2 gloo processes, DeepSpeed's CPU accelerator) trains one MLP per variant, all
engines alive in the same processes: ``shardwise.optim.AdamW`` with 32- and 8-bit state, each
with and without ``offload_optimizer: {device: cpu}`` (``zero_force_ds_cpu_optimizer: false``).
Every repetition runs one training step of every engine in a rotating order and times the whole
step (forward, ``engine.backward``, ``engine.step()``), ``engine.step()`` alone (gradient
partition to fp32, the client optimizer's step, the parameter all-gather; with offload the
gradients were already copied during backward) and, inside it, the client optimizer's own
``step()``. Ratios are against the 32-bit,
non-offloaded engine of the same run; state bytes are counted from the state tensors on each rank.

Run::

    python bench/zero.py [--params-m 8] [--steps 10] [--no-deepspeed | --deepspeed-only]

Prints tables with ratios against their anchors and writes bench/results/zero.json.
The ranks are processes on one machine using gloo; on a shared CPU the absolute times are noisy:
compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from common import fmt_x, machine_facts, rank_env, spawn_ranks, state_bytes, write_json

VARIANTS = ["torch_adamw", "torch_zero", "shardwise", "shardwise_zero1", "shardwise_zero1_8bit"]


def _shapes(params_m: float) -> list[tuple[int, ...]]:
    # Mixed sizes, like a transformer: big matrices, smaller ones and vectors (ZeroRedundancyOptimizer
    # balances whole parameters; shardwise splits each one).
    side = int((params_m * 1e6 / 22) ** 0.5)  # the shapes below hold ~22 * side**2 elements
    shapes = []
    for _ in range(3):
        shapes += [(side * 3, side), (side, side * 3), (side, side), (side,), (side,)]
    shapes += [(side * 2, side // 2), (7, side)]
    return shapes


def _make(variant: str, params: list[torch.nn.Parameter]):
    from shardwise.optim import AdamW

    if variant == "torch_adamw":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)
    if variant == "torch_zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=1e-3, foreach=True)
    bits = 8 if variant.endswith("8bit") else 32
    return AdamW(params, lr=1e-3, impl="auto", state_bits=bits, shard="zero1" in variant)


def _worker(rank: int, world: int, port: int, args, out) -> None:
    rank_env(rank, world, port)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    shapes = _shapes(args.params_m)
    results = {}
    for variant in VARIANTS:
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        grads = [torch.randn(s, generator=g) * 1e-2 for s in shapes]
        opt = _make(variant, params)
        times = []
        for i in range(args.warmup + args.steps):
            for p, gr in zip(params, grads):
                p.grad = gr
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times.append(dt)
        times.sort()
        mine = {"state_bytes": state_bytes(opt), "step_ms": 1e3 * times[len(times) // 2]}
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        results[variant] = {
            "state_bytes_per_rank_max": max(r["state_bytes"] for r in gathered),
            "state_bytes_per_rank_min": min(r["state_bytes"] for r in gathered),
            "step_ms_median_slowest_rank": max(r["step_ms"] for r in gathered),
        }
        del opt, params, grads
    if rank == 0:
        out.put(results)
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, args) -> dict:
    return spawn_ranks(_worker, world, args, timeout=1800)


# ------------------------------------------------------------------------------ DeepSpeed ZeRO-2
#: (name, state_bits, offload): the first one is the anchor of the ratios.
DS_VARIANTS = [
    ("ds_zero2", 32, False),
    ("ds_zero2_8bit", 8, False),
    ("ds_zero2_offload", 32, True),
    ("ds_zero2_offload_8bit", 8, True),
]


def _ds_config(offload: bool, micro_batch: int) -> dict:
    zero: dict = {"stage": 2, "overlap_comm": False, "contiguous_gradients": True}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False  # keep the client optimizer (see docs/sharding.md)
    return config


def _ds_mlp(params_m: float, width: int) -> torch.nn.Module:
    # Blocks of Linear(width, 4 width) + Linear(4 width, width): ~8 width**2 parameters each.
    blocks = max(1, round(params_m * 1e6 / (8 * width * width)))
    layers = []
    for _ in range(blocks):
        layers += [torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width)]
    return torch.nn.Sequential(*layers)


def _ds_worker(rank: int, world: int, port: int, args, out) -> None:
    rank_env(rank, world, port)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    import deepspeed

    from shardwise.optim import AdamW

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, timeout=timedelta(seconds=600))
    width, batch = args.ds_width, 8
    engines, train_times, step_times, opt_times = {}, {}, {}, {}
    for name, bits, offload in DS_VARIANTS:
        torch.manual_seed(0)
        model = _ds_mlp(args.params_m, width)
        opt = AdamW(model.parameters(), lr=1e-4, state_bits=bits)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_ds_config(offload, batch))
        assert engine.optimizer.optimizer is opt and engine.optimizer.cpu_offload is offload, name
        opt_times[name], step_times[name], train_times[name] = [], [], []
        opt.step = _timed(opt.step, opt_times[name])  # DeepSpeed calls it once per param group
        engines[name] = engine
    n_params = sum(p.numel() for p in engines["ds_zero2"].module.parameters())
    g = torch.Generator().manual_seed(1 + rank)
    x, y = torch.randn(batch, width, generator=g), torch.randn(batch, width, generator=g)
    names = list(engines)
    for r in range(args.warmup + args.ds_reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:  # rotating order: load changes hit every variant alike
            engine = engines[name]
            before = len(opt_times[name])
            dist.barrier()
            t0 = time.perf_counter()
            engine.backward((engine(x) - y).square().mean())  # offload: gradients copied here
            t1 = time.perf_counter()
            engine.step()
            t2 = time.perf_counter()
            if r < args.warmup:
                del opt_times[name][before:]
            else:
                train_times[name].append(t2 - t0)
                step_times[name].append(t2 - t1)
                opt_times[name][before:] = [sum(opt_times[name][before:])]
    mine = {
        name: {
            "state_bytes": engines[name].optimizer.optimizer.state_bytes(),
            "state_devices": sorted(
                {v.device.type for s in engines[name].optimizer.optimizer.state.values() for v in s.values()}
            ),
            "train_ms": [1e3 * t for t in train_times[name]],
            "step_ms": [1e3 * t for t in step_times[name]],
            "opt_ms": [1e3 * t for t in opt_times[name]],
        }
        for name in names
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        out.put({"params": n_params, "ranks": gathered})
    dist.barrier()


def _timed(fn, times: list[float]):
    def step(*a, **kw):
        t0 = time.perf_counter()
        result = fn(*a, **kw)
        times.append(time.perf_counter() - t0)
        return result

    return step


def run_deepspeed(args, world: int = 2) -> dict:
    """DeepSpeed ZeRO-2 on ``world`` gloo processes: state bytes per rank and step-time ratios."""
    res = spawn_ranks(_ds_worker, world, args, timeout=3600)
    n_params, ranks = res["params"], res["ranks"]

    def slowest(name: str, key: str) -> list[float]:  # per repetition, the slowest rank
        return [max(vals) for vals in zip(*(r[name][key] for r in ranks))]

    anchor = {key: slowest("ds_zero2", key) for key in ("train_ms", "step_ms", "opt_ms")}
    rows = []
    for name, bits, offload in DS_VARIANTS:
        row = {"variant": name, "state_bits": bits, "offload": offload, "world": world}
        sb = [r[name]["state_bytes"] for r in ranks]
        row["state_bytes_per_rank_max"] = max(sb)
        row["state_bytes_per_rank_min"] = min(sb)
        # per rank, in bytes per parameter of the model times world: 8 (fp32 moments) or ~2.03 (8-bit)
        row["state_bytes_per_param_x_world"] = max(sb) * world / n_params
        row["state_devices"] = sorted({d for r in ranks for d in r[name]["state_devices"]})
        for what in ("train", "step", "opt"):
            times = slowest(name, f"{what}_ms")
            paired = [t / a for t, a in zip(times, anchor[f"{what}_ms"])]  # same repetition, same load
            row.update(
                {
                    f"{what}_ms_median": statistics.median(times),
                    f"{what}_ms_min": min(times),
                    f"{what}_ms_max": max(times),
                    f"{what}_ratio_median": statistics.median(paired),
                    f"{what}_ratio_min": min(paired),
                    f"{what}_ratio_max": max(paired),
                }
            )
        rows.append(row)
    return {
        "params": n_params,
        "world": world,
        "width": args.ds_width,
        "reps": args.ds_reps,
        "warmup": args.warmup,
        "rows": rows,
    }


def headline(doc: dict) -> list[str]:
    """This result's line in the README headline (report.py prints it as it is)."""
    two = {r["variant"]: r for r in doc["rows"] if r["world"] == 2}
    parts = [
        f"{label} **{fmt_x(two[v]['mem_ratio'])}**"
        for v, label in (("shardwise_zero1", "32-bit"), ("shardwise_zero1_8bit", "8-bit"))
        if v in two
    ]
    if not parts:
        return []
    return [
        "- ZeRO-1 on 2 ranks: optimizer state per rank vs unsharded fp32 AdamW: " + ", ".join(parts) + "."
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params-m", type=float, default=8.0, help="model size in millions of parameters")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "zero.json"))
    parser.add_argument("--ds-width", type=int, default=512, help="DeepSpeed MLP width (params-m sets depth)")
    parser.add_argument("--ds-reps", type=int, default=40, help="DeepSpeed interleaved repetitions")
    parser.add_argument("--no-deepspeed", dest="deepspeed", action="store_false", help="ZeRO-1 only")
    parser.add_argument(
        "--deepspeed-only",
        action="store_true",
        help="run the DeepSpeed case only and replace it in an existing --out JSON (ZeRO-1 rows kept)",
    )
    args = parser.parse_args()

    # --deepspeed-only keeps the ZeRO-1 results of an earlier run (with their own date and load)
    payload = json.loads(Path(args.out).read_text()) if args.deepspeed_only else run_zero1(args)
    if args.deepspeed:
        load_before = os.getloadavg()
        ds = payload["deepspeed_zero2"] = run_deepspeed(args)
        ds["loadavg_1_5_15"] = {"before": load_before, "after": os.getloadavg()}
        ds["machine"] = machine_facts()
        ds["config"] = {k: v for k, v in vars(args).items() if k not in ("out", "deepspeed_only")}
        ds["config"]["threads"] = max(1, (os.cpu_count() or 2) // ds["world"])  # per rank
        print(
            f"\nDeepSpeed ZeRO-2, {ds['params'] / 1e6:.1f}M fp32 params, 2 gloo ranks, {ds['reps']} "
            "interleaved reps; ratios (median of per-rep ratios) vs ds_zero2 (32-bit, not offloaded)"
        )
        header = ("variant", "state MB/rank", "B/param*world", "train ratio", "step ratio", "opt ratio")
        print("{:<22} {:>13} {:>13} {:>11} {:>10} {:>9}".format(*header))
        for r in ds["rows"]:
            print(
                f"{r['variant']:<22} {r['state_bytes_per_rank_max'] / 2**20:>13.1f} "
                f"{r['state_bytes_per_param_x_world']:>13.3f} {r['train_ratio_median']:>11.2f} "
                f"{r['step_ratio_median']:>10.2f} {r['opt_ratio_median']:>9.2f}"
            )
        print("(train: forward + backward + engine.step(); step: engine.step(); opt: shardwise's step in it)")
        print(f"load average (1, 5, 15 min) before / after: {ds['loadavg_1_5_15']}")
    payload["headline"] = headline(payload)
    write_json(args.out, payload)


def run_zero1(args) -> dict:
    """ZeRO-1 on 1 and 2 ranks: the ``rows`` of zero.json."""
    load_before = os.getloadavg()
    n_params = sum(torch.Size(s).numel() for s in _shapes(args.params_m))
    by_world = {w: run(w, args) for w in (1, 2)}
    base = by_world[1]["torch_adamw"]
    rows = []
    print(f"{n_params / 1e6:.1f}M fp32 params, {os.cpu_count()} CPUs, gloo; ratios vs torch_adamw on 1 rank")
    header = ("world", "variant", "state MB/rank", "mem ratio", "step ms", "time ratio")
    print("{:>5} {:<22} {:>14} {:>9} {:>9} {:>10}".format(*header))
    for world, res in by_world.items():
        for variant, r in res.items():
            mem_ratio = r["state_bytes_per_rank_max"] / base["state_bytes_per_rank_max"]
            time_ratio = r["step_ms_median_slowest_rank"] / base["step_ms_median_slowest_rank"]
            rows.append(
                {"world": world, "variant": variant, **r, "mem_ratio": mem_ratio, "time_ratio": time_ratio}
            )
            print(
                f"{world:>5} {variant:<22} {r['state_bytes_per_rank_max'] / 2**20:>14.1f} {mem_ratio:>9.3f} "
                f"{r['step_ms_median_slowest_rank']:>9.1f} {time_ratio:>10.2f}"
            )
    for variant in ("torch_zero", "shardwise_zero1"):
        r = by_world[2][variant]
        print(
            f"{variant} on 2 ranks: max/min state per rank = "
            f"{r['state_bytes_per_rank_max'] / max(1, r['state_bytes_per_rank_min']):.3f} (1.0 = balanced)"
        )
    return {
        "params": n_params,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "rows": rows,
        "loadavg_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "machine": machine_facts(),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "deepspeed_only")},
    }


if __name__ == "__main__":
    main()
