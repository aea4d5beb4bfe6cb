"""Generate BENCHMARKS.md and the PNG plots from the JSON results in bench/results/.

Nothing here measures anything and no number is typed by hand: every figure in BENCHMARKS.md comes
from a results JSON written by one of the bench scripts (optim_step, optim_step_cuda, scaling,
memory, e2e, zero, offload, quality_paired, codec_bias, codec_roundtrip, quality_8bit). A missing
JSON becomes a "not run" line; results taken with ``--quick`` are flagged as smoke-test sizes. The
headline ratios (for the README) go into the marked block ``<!-- bench:headline -->`` ...
``<!-- /bench:headline -->``.

    python bench/report.py [--results bench/results] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from common import REPO, RESULTS_DIR, fmt_g, fmt_gib, fmt_mib, fmt_x, machine_line, time_ratio

HEADLINE_BEGIN, HEADLINE_END = "<!-- bench:headline -->", "<!-- /bench:headline -->"
LIB_COLORS = {
    "shardwise": "#1f77b4",
    "torch": "#7f7f7f",
    "deepspeed": "#2ca02c",
    "bitsandbytes": "#d62728",
    "torchao": "#9467bd",
}


# ----------------------------------------------------------------------------------------- helpers
def _load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status", "ok") == "ok"]


def _quick_note(doc: dict) -> str:
    if doc.get("config", {}).get("quick"):
        return "\n> **Smoke-test sizes (`--quick`)**: these numbers are not representative.\n"
    return ""


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_name(doc: dict) -> dict[str, dict]:
    return {r["name"]: r for r in doc["rows"]}


# --------------------------------------------------------------------------------------- optim_step
def optim_step_section(doc: dict, plots: Path, suffix: str = "") -> str:
    cfg = doc["config"]
    shape = "x".join(str(s) for s in cfg["shape"])
    out = [
        f"Step time of one `opt.step()` on {cfg['tensors']} x {shape} fp32 parameters "
        f"({cfg['params'] / 1e6:.1f}M) on `{cfg['device']}`, all candidates in one process, "
        f"{cfg['reps']} interleaved repetitions after {cfg['warmup']} warmup round(s)"
        + (f", {cfg['inner_steps']} steps per timed sample. " if cfg.get("inner_steps", 1) > 1 else ". ")
        + (
            "Ratio = median over the repetitions of the step time / torch fused AdamW's step time in the "
            "same repetition (lower is faster); range = min-max of those per-repetition ratios."
            if cfg.get("ratio") == "median of per-round paired ratios"
            else "Ratio = median step time / median of torch fused AdamW in the same run (lower is "
            "faster); the range is the min-max of the per-repetition paired ratios."
        ),
        f"\nMeasured on: {machine_line(doc)}.",
        _quick_note(doc),
    ]
    rows = []
    for r in doc["rows"]:
        if r["status"] != "ok":
            rows.append([r["label"], r["status"], "", "", ""])
            continue
        rng = f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}" if "ratio_min" in r else ""
        rows.append(
            [
                r["label"],
                f"**{fmt_x(r['ratio'])}**" if "ratio" in r else "",
                rng,
                f"{r['state_bytes_per_param']:.3f}",
                f"{fmt_g(r['median_ms'])} ({fmt_g(r['min_ms'])}-{fmt_g(r['max_ms'])})",
            ]
        )
    out.append(
        _table(["optimizer", "time / torch fused", "range", "state B/param", "median ms (min-max)"], rows)
    )
    matrix = variant_matrix(doc)
    if matrix:
        out += ["\nEach shardwise variant relative to plain AdamW of the same impl and state bits:\n", matrix]
    png = plot_optim_step(doc, plots / f"optim_step{suffix}.png")
    if png:
        out.append(f"\n![optimizer step time ratios]({png})")
    return "\n".join(out)


def variant_matrix(doc: dict) -> str:
    rows = [r for r in _ok(doc["rows"]) if r["library"] == "shardwise"]
    if not rows:
        return ""
    key = lambda r: (r["impl"], r["variant"] + ("+amsgrad" if r["amsgrad"] else ""), r["state_bits"])
    t = {key(r): r for r in rows}
    impls = [i for i in ("fused", "foreach", "reference") if any(k[0] == i for k in t)]
    variants = list(dict.fromkeys(k[1] for k in t))
    header = ["variant"] + [f"{i} {b}-bit" for i in impls for b in (32, 8)]
    body = []
    for v in variants:
        cells = [v]
        for i in impls:
            for b in (32, 8):
                base = t.get((i, "adam", b))
                cells.append(fmt_x(time_ratio(t[(i, v, b)], base)) if (i, v, b) in t and base else "")
        body.append(cells)
    return _table(header, body)


def plot_optim_step(doc: dict, path: Path) -> str | None:
    rows = [r for r in _ok(doc["rows"]) if "ratio" in r]
    if not rows:
        return None
    plt = _plt()
    rows = sorted(rows, key=lambda r: r["ratio"], reverse=True)
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.2))
    ax.barh(
        [r["label"] for r in rows],
        [r["ratio"] for r in rows],
        xerr=[[r["ratio"] - r["ratio_min"] for r in rows], [r["ratio_max"] - r["ratio"] for r in rows]],
        color=[LIB_COLORS.get(r["library"], "#333") for r in rows],
    )
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    from matplotlib.patches import Patch

    libs = dict.fromkeys(r["library"] for r in rows)
    ax.legend(handles=[Patch(color=LIB_COLORS.get(lib, "#333"), label=lib) for lib in libs], fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("step time / torch fused AdamW (log scale; lower is faster)")
    cfg = doc["config"]
    ax.set_title(f"Optimizer step, {cfg['params'] / 1e6:.1f}M fp32 params, {cfg['device']}", fontsize=10)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return _save(fig, path, plt)


def _save(fig, path: Path, plt) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    try:
        return path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return path.as_posix()


# ------------------------------------------------------------------------------------------ scaling
def scaling_section(doc: dict, plots: Path, suffix: str = "") -> str:
    bw = doc["copy_bandwidth_bytes_per_s"]
    out = [
        "Step time and optimizer state vs parameter count, next to the memory-bandwidth bound "
        "(bytes moved per step / measured copy bandwidth; "
        + ", ".join(f"{k}-bit state: {v:g} B/param" for k, v in doc["bytes_moved_per_param"].items())
        + f"; copy bandwidth {bw / 1e9:.1f} GB/s). `of bound` = bound / measured (1.0 = at the bound).",
        f"\nMeasured on: {machine_line(doc)}.",
        _quick_note(doc),
    ]
    labels = list(dict.fromkeys(r["label"] for r in doc["rows"]))
    sizes = sorted({r["params"] for r in doc["rows"]})
    cell = {(r["label"], r["params"]): r for r in doc["rows"]}
    body = []
    for n in sizes:
        row = [f"{n / 1e6:.1f}M"]
        base = cell.get((labels[0], n), {})
        for lab in labels:
            r = cell.get((lab, n), {})
            if r.get("status") != "ok":
                row.append(r.get("status", ""))
                continue
            ratio = f"{r['median_ms'] / base['median_ms']:.2f}x, " if base.get("status") == "ok" else ""
            row.append(f"{ratio}{fmt_g(r['median_ms'])} ms, {r['fraction_of_bound']:.2f} of bound")
        body.append(row)
    out.append(
        _table(["params"] + [f"{lab} (vs {labels[0]})" if i else lab for i, lab in enumerate(labels)], body)
    )
    png = plot_scaling(doc, plots / f"scaling{suffix}.png")
    if png:
        out.append(f"\n![step time and memory vs parameter count]({png})")
    return "\n".join(out)


def plot_scaling(doc: dict, path: Path) -> str | None:
    rows = _ok(doc["rows"])
    if not rows:
        return None
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    bounds_drawn = set()
    for lab in dict.fromkeys(r["label"] for r in rows):
        rs = sorted((r for r in rows if r["label"] == lab), key=lambda r: r["params"])
        xs = [r["params"] for r in rs]
        (line,) = ax1.plot(xs, [r["median_ms"] for r in rs], "o-", label=lab)
        ax2.plot(xs, [r["state_bytes"] / 2**20 for r in rs], "o-", color=line.get_color(), label=lab)
        bits = rs[0]["state_bits"]
        if bits not in bounds_drawn:  # one bound per state width: it depends only on bytes moved
            bounds_drawn.add(bits)
            per_param = doc["bytes_moved_per_param"][str(bits)]
            ax1.plot(
                xs,
                [r["bound_ms"] for r in rs],
                ":",
                color=line.get_color(),
                label=f"bandwidth bound, {bits}-bit state ({per_param:g} B/param)",
            )
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_ylabel("step time, ms (median)")
    ax1.set_title(f"step time vs memory-bandwidth bound (dotted), {doc['config']['device']}", fontsize=10)
    ax1.legend(fontsize=7)
    ax2.set_ylabel("optimizer state, MiB")
    ax2.set_title("optimizer state", fontsize=10)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path, plt)


# ------------------------------------------------------------------------------------------- memory
def memory_section(doc: dict, plots: Path) -> str:
    cfg = doc["config"]
    out = [
        f"Peak resident memory (RSS high-water, a fresh process per optimizer) of {cfg['steps']} training "
        f"steps of the GPT recipe's model (`{cfg['model']}`) at batch {cfg['batch_size']} x "
        f"{cfg['seq_len']} tokens, synthetic ids; `over floor` = peak minus the forward + backward "
        "only run.",
        f"\nMeasured on: {machine_line(doc)}.",
        _quick_note(doc),
    ]
    ref = _by_name(doc).get("torch_adamw", {})
    body = []
    for r in doc["rows"]:
        if r["status"] != "ok":
            body.append([r["label"], r["status"], "", "", ""])
            continue
        vs = fmt_x(r["peak_rss_bytes"] / ref["peak_rss_bytes"]) if ref.get("status") == "ok" else ""
        body.append(
            [
                r["label"],
                vs,
                fmt_gib(r["peak_rss_bytes"]),
                fmt_gib(r.get("peak_over_floor_bytes", 0)) if "peak_over_floor_bytes" in r else "",
                f"{fmt_mib(r['state_bytes'])} ({r['state_bytes_per_param']:.2f} B/param)",
            ]
        )
    out.append(
        _table(["optimizer", "peak / torch AdamW", "peak RSS GiB", "over floor GiB", "state MiB"], body)
    )
    png = plot_memory(doc, plots / "memory.png")
    if png:
        out.append(f"\n![peak memory per optimizer]({png})")
    return "\n".join(out)


def plot_memory(doc: dict, path: Path) -> str | None:
    rows = _ok(doc["rows"])
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.2))
    labels = [r["label"] for r in rows]
    peak = [r["peak_rss_bytes"] / 2**30 for r in rows]
    state = [r["state_bytes"] / 2**30 for r in rows]
    ax.barh(labels, peak, color="#aec7e8", label="peak RSS")
    ax.barh(labels, state, color="#1f77b4", label="of which optimizer state")
    ax.set_xlabel("GiB")
    ax.set_title(f"Peak memory, {doc['config']['model']}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.invert_yaxis()
    fig.tight_layout()
    return _save(fig, path, plt)


# ---------------------------------------------------------------------------------------------- e2e
def e2e_section(doc: dict, plots: Path, suffix: str = "") -> str:
    cfg = doc["config"]
    if "cases" not in doc:  # one case (MiniLM), written before the GPT and DDP cases existed
        intro = (
            "Training throughput of the BERT recipe's model "
            f"(`{cfg['model']}`, {cfg['num_labels']} labels) at batch {cfg['batch_size']} x "
            f"{cfg['seq_len']} tokens, synthetic data identical for every row; "
        )
        groups = [(None, doc["rows"])]
    else:
        intro = (
            f"Training throughput of the recipes' models on `{cfg['device']}` ({cfg['precision']}), "
            "synthetic data identical for every row of a case; "
        )
        groups = [(case, [r for r in doc["rows"] if r["case"] == case]) for case in doc["cases"]]
    if cfg.get("ratio") == "median of per-round paired ratios":
        rounds = cfg["rounds"] or ", ".join(f"{c['rounds']} ({n})" for n, c in doc["cases"].items())
        how = (
            f"{rounds} interleaved rounds of {cfg['steps_per_round']} timed steps each. Ratio = the "
            "median over rounds of samples/s / samples/s of the plain loop with torch fused AdamW in "
            "the same round (higher is faster); range = min-max of those per-round ratios."
        )
    else:  # results written before the ratio was the median of the paired ratios
        how = (
            f"{cfg['rounds']} interleaved rounds of {cfg['steps_per_round']} timed steps each. "
            "Ratio = samples/s / samples/s of the plain loop with torch fused AdamW"
            + (" of the same case" if "cases" in doc else "")
            + " (higher is faster)"
            + ("; range = min-max of the per-round paired ratios." if "cases" in doc else ".")
        )
    out = [
        intro + how,
        f"\nMeasured on: {machine_line(doc)}.",
        _quick_note(doc),
    ]
    for case, rows in groups:
        if case is not None:
            c = doc["cases"][case]
            ranks = f", {c['world']} processes (DDP, gloo)" if c["world"] > 1 else ""
            out.append(
                f"\n**{case}**: `{c['model']}` ({c['kind']}), batch {c['batch_size']} x {c['seq_len']} "
                f"tokens{' per rank' if ranks else ''}{ranks}.\n"
            )
        body = []
        for r in rows:
            if r["status"] != "ok":
                body.append([r["label"], r["status"], "", ""] + ([""] if case else []))
                continue
            ratio = [f"**{fmt_x(r['ratio'])}**" if "ratio" in r else ""]
            if case is not None:
                ratio.append(f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}" if "ratio_min" in r else "")
            sps = (
                f"{fmt_g(r['samples_per_s'])} "
                f"({fmt_g(r['samples_per_s_min'])}-{fmt_g(r['samples_per_s_max'])})"
            )
            body.append([r["label"], *ratio, sps, fmt_mib(r["state_bytes"])])
        header = ["loop, optimizer", "samples/s ratio"] + (["range"] if case else [])
        out.append(_table([*header, "samples/s (min-max)", "state MiB"], body))
    png = plot_e2e(doc, plots / f"e2e{suffix}.png")
    if png:
        out.append(f"\n![end-to-end samples/s]({png})")
    return "\n".join(out)


def plot_e2e(doc: dict, path: Path) -> str | None:
    rows = _ok(doc["rows"])
    if not rows:
        return None
    plt = _plt()
    if "cases" not in doc:
        labels, title = [r["label"] for r in rows], f"End-to-end training, {doc['config']['model']}"
        xs = [r["samples_per_s"] for r in rows]
        err = [
            [r["samples_per_s"] - r["samples_per_s_min"] for r in rows],
            [r["samples_per_s_max"] - r["samples_per_s"] for r in rows],
        ]
        xlabel = "samples/s (median, min-max over rounds)"
    else:  # cases differ in samples/s by orders of magnitude: plot the ratios
        rows = [r for r in rows if "ratio" in r]
        if not rows:
            return None
        labels = [f"{r['case']}: {r['label']}" for r in rows]
        title = f"End-to-end training, {doc['config']['device']}"
        xs = [r["ratio"] for r in rows]
        err = [[r["ratio"] - r["ratio_min"] for r in rows], [r["ratio_max"] - r["ratio"] for r in rows]]
        xlabel = "samples/s / plain loop with torch fused AdamW (median, min-max of paired rounds)"
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    ax.barh(
        labels,
        xs,
        xerr=err,
        color=["#1f77b4" if "shardwise" in r["name"] else "#7f7f7f" for r in rows],
    )
    if "cases" in doc:
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.invert_yaxis()
    fig.tight_layout()
    return _save(fig, path, plt)


# ---------------------------------------------------------------------------------------- gpu check
def gpu_check_section(doc: dict, run: dict | None) -> str:
    """bench/gpu_check.py (compiled fused path vs reference on the device) and gpu.sh's stages."""
    tol = doc["tolerances"]
    out = [
        f"bench/gpu.sh checks correctness on `{doc['config']['device']}` before it times anything: "
        f"the compiled fused backend vs the reference implementation, {doc['config']['steps']} steps "
        "of fresh random gradients, and `AdamW(impl='fused')` vs `AdamW(impl='reference')` on "
        f"mixed parameters. Pass: relative error <= {tol['rel_32bit']:g} (32-bit state), parameters "
        f"<= {tol['rel_param_8bit']:g} and codes within 1 on >= {tol['codes_equal_8bit']:.1%} of "
        "elements (8-bit). **"
        + ("All passed" if doc["passed"] else "NOT all passed" if doc.get("complete", True) else "Incomplete")
        + "**.",
        f"\nMeasured on: {machine_line(doc)}.",
        _quick_note(doc),
    ]
    body = []
    for r in doc["rows"]:
        rel = [v for k, v in r.items() if k.startswith("rel_") and isinstance(v, float)]
        eq = [v for k, v in r.items() if k.endswith("codes_equal")]
        body.append(
            [
                r["check"],
                r["rule"],
                f"{r['state_bits']}-bit",
                r["status"],
                f"{r['rel_param']:.1e}" if "rel_param" in r else "",
                f"{max(rel):.1e}" if rel else "",
                f"{min(eq):.4%}" if eq else "",
            ]
        )
    out.append(
        _table(
            ["check", "rule", "state", "status", "param rel err", "max rel err", "codes equal (min)"], body
        )
    )
    if run:
        out += [
            f"\ngpu.sh stages ({run['total_seconds']} s in all):\n",
            _table(
                ["stage", "status", "seconds", "limit s"],
                [[s["stage"], s["status"], str(s["seconds"]), str(s["limit_s"])] for s in run["stages"]],
            ),
        ]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- zero
def zero_section(doc: dict) -> str:
    def _range(row: dict, what: str) -> str:
        return f"{row[f'{what}_ratio_min']:.2f}-{row[f'{what}_ratio_max']:.2f}"

    out = [
        "ZeRO-1 (bench/zero.py): per-rank optimizer state and step time, 1 vs 2 ranks (gloo processes "
        f"on one machine), {doc['params'] / 1e6:.1f}M fp32 params, {doc.get('cpus', '?')} CPUs, torch "
        f"{doc.get('torch', '?')}. Ratios are against torch AdamW (DDP, every rank keeps all state) "
        "on 1 rank. "
        + (
            f"Measured on: {machine_line(doc)}. {_load_note(doc)}"
            if doc.get("machine")
            else "(Measured in an earlier run than the DeepSpeed table below; date and load not recorded.)"
        ),
        "",
    ]
    body = [
        [
            str(r["world"]),
            r["variant"],
            fmt_x(r["mem_ratio"]),
            fmt_x(r["time_ratio"]),
            fmt_mib(r["state_bytes_per_rank_max"]),
            fmt_g(r["step_ms_median_slowest_rank"]),
        ]
        for r in doc["rows"]
    ]
    out.append(
        _table(
            [
                "ranks",
                "optimizer",
                "state / rank ratio",
                "time ratio",
                "state MiB / rank",
                "step ms (slowest rank)",
            ],
            body,
        )
    )
    ds = doc.get("deepspeed_zero2")
    if ds:
        out += [
            "",
            f"DeepSpeed ZeRO-2 with `shardwise.optim.AdamW` on {ds['world']} gloo processes (DeepSpeed's CPU "
            f"accelerator), an MLP of {ds['params'] / 1e6:.1f}M fp32 params, every engine alive in the same "
            f"processes and stepped in a rotating order, {ds['reps']} repetitions after {ds['warmup']} "
            "warmup. Ratios are medians of per-repetition ratios (slowest rank) against the 32-bit, "
            "non-offloaded engine, range min-max. Train step = forward + `engine.backward` + "
            "`engine.step()`; `engine.step()` includes DeepSpeed's gradient partition copy (with offload "
            "the gradients are copied during backward instead) and parameter all-gather; `opt.step()` is "
            "the shardwise step inside it. "
            "State is counted from the state tensors on each rank; B/param x world = bytes per rank x "
            "ranks / params.",
            "",
        ]
        rows = []
        for r in ds["rows"]:
            rows.append(
                [
                    r["variant"],
                    f"{r['state_bits']}-bit",
                    "cpu" if r["offload"] else "none",
                    fmt_mib(r["state_bytes_per_rank_max"]),
                    f"{r['state_bytes_per_param_x_world']:.3f}",
                    f"**{fmt_x(r['train_ratio_median'])}** ({_range(r, 'train')})",
                    f"{fmt_x(r['step_ratio_median'])} ({_range(r, 'step')})",
                    f"{fmt_x(r['opt_ratio_median'])} ({_range(r, 'opt')})",
                    " / ".join(fmt_g(r[f"{what}_ms_median"]) for what in ("train", "step", "opt")),
                ]
            )
        out.append(
            _table(
                [
                    "engine",
                    "state",
                    "offload_optimizer",
                    "state MiB / rank",
                    "B/param x world",
                    "train step ratio",
                    "engine.step() ratio",
                    "opt.step() ratio",
                    "ms: train / engine.step() / opt.step()",
                ],
                rows,
            )
        )
        if ds.get("machine"):
            out += ["", f"Measured on: {machine_line(ds)}. {_load_note(ds)}"]
    return "\n".join(out)


def _load_note(doc: dict) -> str:
    load = doc.get("loadavg_1_5_15")
    if not load:
        return ""
    before, after = (", ".join(f"{x:.2f}" for x in load[k]) for k in ("before", "after"))
    cpus = doc.get("machine", {}).get("logical_cpus") or 0
    busy = max(load["before"][0], load["after"][0]) > cpus > 0
    note = f" (above the {cpus} CPUs: other work shared the machine; read the ratios)" if busy else ""
    return f"Load average (1, 5, 15 min) before / after: {before} / {after}{note}."


# ------------------------------------------------------------------------------------------ offload
def offload_section(doc: dict) -> str:
    """bench/offload.py: host / device bytes per parameter and the offloaded step, per parameter set."""
    cfg = doc["config"]
    out = [
        "CPU offload (bench/offload.py): `CPUOffloadOptimizer` keeps fp32 masters, transfer buffers and "
        "the optimizer state in host memory and steps there. Host and device bytes per parameter are "
        "measured from the tensors each candidate holds; times are one `step()` (gradients to the "
        "host, update, parameters back), all candidates interleaved in one process "
        f"({cfg['reps']} rounds after {cfg['warmup']} warmup). "
        + (
            "No accelerator was used: the device parameters are host tensors too, so every copy is a "
            "memcpy, not a PCIe transfer."
            if str(cfg.get("device", "cpu")).startswith("cpu")
            else f"Device: `{cfg['device']}`."
        ),
        f"\nMeasured on: {machine_line(doc)}"
        + (
            f"; load average {doc['loadavg_before'][0]:.1f} before, {doc['loadavg_after'][0]:.1f} after."
            if "loadavg_before" in doc
            else "."
        ),
        _quick_note(doc),
    ]
    for s in doc["sets"]:
        out.append(f"\n**{s['name']}**: {s['tensors']} tensors, {s['params'] / 1e6:.1f}M params.\n")
        body = []
        for r in s["rows"]:
            if r["status"] != "ok":
                body.append([r["label"], r["status"], "", "", "", ""])
                continue
            body.append(
                [
                    r["label"],
                    f"{r['host_bytes_per_param']:.2f}",
                    f"{r['device_bytes_per_param']:.2f}",
                    f"**{fmt_x(r['ratio'])}**" if "ratio" in r else "",
                    fmt_x(r["ratio_vs_deepspeed"]) if "ratio_vs_deepspeed" in r else "",
                    f"{fmt_g(r['median_ms'])} ({fmt_g(r['min_ms'])}-{fmt_g(r['max_ms'])})",
                ]
            )
        out.append(
            _table(
                [
                    "optimizer",
                    "host B/param",
                    "device B/param",
                    "time / torch fused",
                    "time / DeepSpeedCPUAdam + copies",
                    "median ms (min-max)",
                ],
                body,
            )
        )
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ quality
def quality_section(doc: dict, results: Path) -> str:
    """bench/quality_8bit.py's runs (the demo fine-tune with 32- and 8-bit state): final metrics."""
    body = []
    for r in doc["runs"]:
        f = r["final"]
        acc, f1 = f.get("eval/accuracy"), f.get("eval/macro_f1")
        body.append(
            [
                r["variant"],
                f"{r['state_bits']}-bit",
                f"{acc:.4f}" if acc is not None else "",
                f"{f1:.4f}" if f1 is not None else "",
                f"{r['train_loss'][-1][1]:.4f}" if r.get("train_loss") else "",
            ]
        )
    out = [
        "Accuracy cost of 8-bit state (bench/quality_8bit.py, run separately: it trains the demo "
        "fine-tune, MiniLM on Reuters R8, once per state width with the same seed and data order).",
        "",
        _table(["variant", "state", "eval accuracy", "eval macro-F1", "final train loss"], body),
    ]
    png = results / "quality_8bit.png"
    if png.exists():
        try:
            rel = png.resolve().relative_to(REPO).as_posix()
        except ValueError:
            rel = png.as_posix()
        out.append(f"\n![32- vs 8-bit loss curves]({rel})")
    return "\n".join(out)


def quality_paired_section(doc: dict, plots: Path) -> str:
    """bench/quality_paired.py: per task, each candidate's mean paired eval-loss difference to
    shardwise 32-bit with its 95% t-interval, absolute and relative, plus the secondary metrics."""
    out = [
        "Does 8-bit optimizer state cost quality? Paired fine-tunes (bench/quality_paired.py, run "
        "separately: it trains real models for hours on 2 CPU cores): for each seed every "
        "optimizer starts from the same model and sees the same batches and dropout masks; the "
        "difference of its held-out loss to shardwise 32-bit's is taken per seed, then averaged over "
        "the seeds, with a 95% t-interval. An interval that includes 0 means no measurable "
        "difference at this sample size. The median difference and the count of seeds below 0 "
        "are what one chaotic seed cannot move (on a seed where training is on the edge of a loss "
        "spike, any perturbation, even float rounding, moves the final loss far more than on the "
        "other seeds, and that seed then sets most of the mean). The mean absolute difference "
        "(mean over the seeds of |eval loss - 32-bit eval loss|) is how far an optimizer moves the "
        "result from 32-bit's in either direction: a seed it lowers does not cancel a seed it raises."
        + (
            " torch fused AdamW (fp32) is a second 32-bit implementation: its row shows how far float "
            "rounding alone, amplified by training, moves the result."
            if any(r["candidate"] == "torch_fused" for r in doc["runs"])
            else ""
        ),
        "\n*Train-loss deviation*: how closely a run follows the 32-bit run on the same batches, "
        "step by step (mean over the steps of |train loss - 32-bit train loss|, median over the "
        "seeds). The eval-loss difference is one number at the end of a chaotic process (a single "
        "loss spike can amplify a tiny difference into most of it); the deviation shows the "
        "optimizer's fidelity with far less noise.",
        f"\nMeasured on: {machine_line(doc)}.",
        _quick_note(doc),
    ]
    sweeps = swept_tasks(doc)
    for task, settings in doc["tasks"].items():
        if task in sweeps and not doc["summary"].get(task):
            continue  # the baseline alone at another setting: a row of the sweep table below
        summary = doc["summary"].get(task, {})
        base = [
            r["eval_loss"]
            for r in doc["runs"]
            if r["task"] == task and r["candidate"] == "shardwise_32bit" and r.get("status") == "ok"
        ]
        out.append(
            f"\n**{task}**: `{settings['model']}`, "
            + (f"{settings['max_steps']} steps" if settings["max_steps"] else "1 epoch")
            + f" of {settings['batch_size']} x {settings['seq_len']} tokens, lr {settings['lr']:g}, betas "
            f"{tuple(settings['betas'])}, eps {settings['eps']:g}, weight decay "
            f"{settings['weight_decay']:g}, {settings['warmup_ratio']:.0%} warmup then linear decay, "
            f"clip {settings['max_grad_norm']:g}. "
            + (
                f"shardwise 32-bit eval loss over {len(base)} seeds: {statistics.fmean(base):.4f}"
                + (f" (seed sd {statistics.stdev(base):.4f})." if len(base) > 1 else ".")
                if base
                else ""
            )
            + "\n"
        )
        body = []
        for r in summary.values():
            extra = []
            for metric, fmt in (("accuracy", "{:.4f}"), ("macro_f1", "{:.4f}"), ("perplexity", "{:.3f}")):
                if metric in r:
                    m = r[metric]
                    extra.append(f"{metric} {fmt.format(m['candidate'])} vs {fmt.format(m['baseline'])}")
            body.append(
                [
                    r["label"],
                    str(r["n"]),
                    f"{r['mean_diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]",
                    f"**{100 * r['rel_mean']:+.2f}%** "
                    f"[{100 * r['rel_low']:+.2f}, {100 * r['rel_high']:+.2f}]",
                    f"{r['median_diff']:+.4f} ({r['below']}/{r['n']})" if "median_diff" in r else "",
                    f"{r['mean_abs_diff']:.4f}" if "mean_abs_diff" in r else "",
                    f"{r['train_deviation']:.1e}" if "train_deviation" in r else "",
                    "; ".join(extra),
                ]
            )
        unavailable = sorted(
            {
                (r["candidate"], r["status"])
                for r in doc["runs"]
                if r["task"] == task and r.get("status") != "ok"
            }
        )
        body += [[c, "0", status, "", "", "", "", ""] for c, status in unavailable]
        versus = [
            f"{r['label']} {r['vs_shardwise_8bit']['mean_diff']:+.4f} "
            f"[{r['vs_shardwise_8bit']['ci_low']:+.4f}, {r['vs_shardwise_8bit']['ci_high']:+.4f}] "
            f"({r['vs_shardwise_8bit']['n']} seeds)"
            for r in summary.values()
            if "vs_shardwise_8bit" in r
        ]
        out.append(
            _table(
                [
                    "optimizer",
                    "seeds",
                    "eval loss - 32-bit [95% CI]",
                    "relative [95% CI]",
                    "median (seeds below 0)",
                    "mean abs. difference",
                    "train-loss deviation",
                    "mean metrics vs 32-bit",
                ],
                body,
            )
        )
        if versus:
            out.append(
                "\nThe other 8-bit optimizers against shardwise 8-bit directly (eval loss, paired mean "
                "difference [95% CI]): " + "; ".join(versus) + "."
            )
        distance = [
            f"{r['label']} {d['mean_diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] "
            f"(ours the closer on {d['n'] - d['below'] - d['diffs'].count(0.0)} of {d['n']} seeds)"
            for r in summary.values()
            if (d := r.get("distance_vs_shardwise_8bit"))
        ]
        if distance:
            out.append(
                "Their distance from 32-bit against ours (|their eval loss - 32-bit| - |ours - 32-bit|, "
                "paired mean [95% CI]; above 0: theirs is the larger): " + "; ".join(distance) + "."
            )
    if sweeps:
        out.append(sweep_table(doc, sweeps))
    png = plot_quality_paired(doc, plots / "quality_paired.png")
    if png:
        out.append(f"\n![paired eval-loss differences to 32-bit]({png})")
    return "\n".join(out)


def swept_tasks(doc: dict) -> dict[str, str]:
    """Tasks run at another ``--lr`` / ``--eps`` (``<task>_lr<lr>``, ``<task>_eps<eps>``, or both),
    each mapped to its default task."""
    out = {}
    for task in doc["tasks"]:
        match = re.fullmatch(r"(.+?)(?:_(?:lr|eps)[0-9.e+-]+)+", task)
        if match and match[1] in doc["tasks"]:
            out[task] = match[1]
    return out


def sweep_table(doc: dict, sweeps: dict[str, str]) -> str:
    """Tasks run at another lr or eps (``sweeps`` maps each to its default task): shardwise 32-bit's
    mean eval loss at that setting, next to the default's on the same seeds (is the paired
    comparison at a sensible setting?)."""
    ok = [r for r in doc["runs"] if r["candidate"] == "shardwise_32bit" and r.get("status") == "ok"]
    loss = {(r["task"], r["seed"]): r["eval_loss"] for r in ok}

    def changed(task: str) -> list[tuple[str, float, float]]:
        new, old = doc["tasks"][task], doc["tasks"][sweeps[task]]
        return [(p, new[p], old[p]) for p in ("lr", "eps") if new[p] != old[p]]

    body = []
    for task in sorted(sweeps, key=lambda t: (sweeps[t], changed(t))):
        default = sweeps[task]
        seeds = sorted(seed for t, seed in loss if t == task and (default, seed) in loss)
        if not seeds:
            continue
        diffs = [loss[task, s] - loss[default, s] for s in seeds]
        body.append(
            [
                default,
                ", ".join(f"{p} {new:g} (task's {old:g})" for p, new, old in changed(task)),
                " ".join(map(str, seeds)),
                f"{statistics.fmean(loss[task, s] for s in seeds):.4f}",
                f"{statistics.fmean(loss[default, s] for s in seeds):.4f}",
                f"{statistics.median(diffs):+.4f} ({sum(d < 0 for d in diffs)}/{len(diffs)})",
            ]
        )
    if not body:
        return ""
    return "\n".join(
        [
            "\nIs the comparison at sensible hyperparameters? shardwise 32-bit at another lr or Adam "
            "eps (`--lr`, `--eps`; same seeds, everything else equal), against the task's own:\n",
            _table(
                [
                    "task",
                    "changed",
                    "seeds",
                    "eval loss, changed",
                    "eval loss, task's own",
                    "median difference (seeds below 0)",
                ],
                body,
            ),
        ]
    )


def plot_quality_paired(doc: dict, path: Path) -> str | None:
    tasks = [t for t, s in doc["summary"].items() if s]
    if not tasks:
        return None
    plt = _plt()
    rows_per_task = [len(doc["summary"][t]) for t in tasks]
    fig, axes = plt.subplots(
        len(tasks), 1, figsize=(8, 1.6 + 0.5 * sum(rows_per_task)),
        gridspec_kw={"height_ratios": [n + 1 for n in rows_per_task]},
    )  # fmt: skip
    axes = axes if len(tasks) > 1 else [axes]
    for ax, task in zip(axes, tasks, strict=True):
        rows = list(doc["summary"][task].items())
        ax.axvspan(-1, 1, color="#eeeeee", zorder=0)  # +-1% of the 32-bit loss
        ax.axvline(0, color="k", lw=0.8)
        for y, (_, r) in enumerate(rows):
            mean, low, high = (100 * r[k] for k in ("rel_mean", "rel_low", "rel_high"))
            color = LIB_COLORS.get(r["library"], "k")
            ax.errorbar([mean], [y], xerr=[[mean - low], [high - mean]], fmt="o", color=color, capsize=4)
        ys = range(len(rows))
        ax.set_yticks(list(ys), [r["label"] for _, r in rows])
        ax.invert_yaxis()
        ax.set_title(f"{task}: eval loss - shardwise 32-bit, paired mean, 95% CI", fontsize=9, loc="right")
    axes[-1].set_xlabel("eval loss difference, % of the 32-bit loss")
    fig.tight_layout()
    return _save(fig, path, plt)


def codec_bias_section(doc: dict) -> str:
    """bench/codec_bias.py: Adam's moments carried through each 8-bit codec vs fp32, by decile of |g|."""
    body = [
        [
            r.get("codec", "shardwise"),  # results written before codec_bias compared codecs
            f"{r['decades']:g}",
            str(r["step"]),
            r["decile"],
            f"{r['v8_over_v32']:.4f}",
            f"{r['m8_over_m32']:.4f}",
            f"**{r['update_ratio']:.4g}**",
            f"{r['v_zero']:.2%}",
        ]
        for r in doc["rows"]
    ]
    body += [
        [name, status, "", "", "", "", "", ""]
        for name, status in doc.get("status", {}).items()
        if status != "ok"
    ]
    return "\n".join(
        [
            "Bias each 8-bit codec adds to the moments it re-encodes at every step (bench/codec_bias.py, "
            "no model): gradients whose scales spread log-uniformly over 1 or 3 decades inside every "
            f"256-element block, Adam's moments (betas {tuple(doc['config']['betas'])}) in fp32 and, "
            "side by side, through each codec's encode/decode. Ratios 8-bit / fp32 per decile of the "
            "gradient scale; the update is |m / sqrt(v)| from the stored moments; the last column is "
            "the share of elements whose stored v is 0 (where m is not, the stored moments imply a "
            "step of m / eps: the huge ratios; the optimizer adds the next gradient's term to v "
            "first, so such an element's real step is large but finite).",
            f"\nMeasured on: {machine_line(doc)}.\n",
            _table(
                [
                    "codec",
                    "decades",
                    "step",
                    "decile of abs(g)",
                    "v8 / v32",
                    "abs(m8) / abs(m32)",
                    "update 8 / 32",
                    "v stored as 0",
                ],
                body,
            ),
        ]
    )


def codec_roundtrip_section(doc: dict, plots: Path) -> str:
    """bench/codec_roundtrip.py: each codec's one-step error on the states of a real 32-bit run."""
    cfg = doc["config"]
    body = [
        [
            name,
            f"**{s['update_median']:.4f}**",
            f"{s['update_max']:.4f}",
            f"{s['update_at_spike']:.4f} (step {s['spike_step']})",
            f"{s['m_median']:.4f}",
            f"{s['v_median']:.4f}",
        ]
        for name, s in doc["summary"].items()
    ]
    body += [[name, status, "", "", "", ""] for name, status in doc["status"].items() if status != "ok"]
    out = [
        "Each codec's error on real optimizer states, without seed noise (bench/codec_roundtrip.py): "
        f"one 32-bit fine-tune ({cfg['task']}, seed {cfg['seed']}, {len(doc['rows']) + 1} steps); before "
        "every step, the stored moments of every tensor an 8-bit optimizer quantizes go once through "
        "each codec, and the step's update is computed from the decoded and from the exact moments "
        "with the same gradient. Relative L2 errors over all those tensors (median and max over the "
        "steps; the spike is the step with the largest rise in training loss).",
        f"\nMeasured on: {machine_line(doc)}.",
        _quick_note(doc),
        _table(["codec", "update error (median)", "max", "at the loss spike", "m error", "v error"], body),
    ]
    png = plot_codec_roundtrip(doc, plots / "codec_roundtrip.png")
    if png:
        out.append(f"\n![update error per step]({png})")
    return "\n".join(out)


def plot_codec_roundtrip(doc: dict, path: Path) -> str | None:
    if not doc["summary"]:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    steps = [r["step"] for r in doc["rows"]]
    for name in doc["summary"]:
        color = LIB_COLORS.get(name, "k")  # a codec is named by its library
        ax.plot(steps, [r[name]["update"] for r in doc["rows"]], "o-", ms=3, color=color, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("relative update error")
    loss = ax.twinx()
    loss.plot(steps, [r["train_loss"] for r in doc["rows"]], color="#999999", lw=1, ls="--")
    loss.set_ylabel("train loss (dashed)")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(
        f"one pass through each codec, {doc['config']['task']} seed {doc['config']['seed']}", fontsize=9
    )
    fig.tight_layout()
    return _save(fig, path, plt)


# ----------------------------------------------------------------------------------------- headline
def headline(docs: dict[str, dict | None]) -> str:
    """The few ratios a README quotes: each script declares its own lines (the JSON's ``headline``),
    in the order of ``docs``; the first contributing result says where they were measured."""
    lines, src = [], None
    for doc in docs.values():
        if doc and doc.get("headline"):
            lines += doc["headline"]
            if src is None and "machine" in doc:
                src = doc
    if not lines:
        lines.append("- No results yet: run `bench/run_all.sh`.")
    if src:
        lines.append(f"\n<sub>Measured on {machine_line(src)}. Details: BENCHMARKS.md.</sub>")
    return "\n".join([HEADLINE_BEGIN, *lines, HEADLINE_END])


# --------------------------------------------------------------------------------------------- main
def render(results: Path, plots: Path | None = None) -> str:
    plots = plots or results
    names = (
        "optim_step",
        "optim_step_cuda",
        "optim_step_cuda_1b",
        "scaling",
        "scaling_cuda",
        "memory",
        "e2e",
        "e2e_cuda",
        "zero",
        "offload",
        "quality_paired",
        "codec_bias",
        "codec_roundtrip",
        "quality_8bit",
        "gpu_check",
        "gpu_run",
    )
    docs = {n: _load(results, n) for n in names}
    quick = any((d or {}).get("config", {}).get("quick") for d in docs.values())
    parts = [
        "# Benchmarks",
        "",
        "<!-- Generated by bench/report.py from bench/results/*.json. Do not edit by hand; run "
        "`bench/run_all.sh` (or `make bench`). -->",
        "",
        "How to read: every table compares candidates measured in ONE process with interleaved "
        "repetitions; read the ratios, not the absolute times, which depend on the machine and its load.",
        "",
    ]
    if quick:
        parts += ["> **Some results below were taken with `--quick` (smoke-test sizes).**", ""]
    parts += ["## Headline", "", headline(docs), ""]
    sections = [
        ("Optimizer step (CPU)", "optim_step", lambda d: optim_step_section(d, plots)),
        ("Optimizer step (CUDA)", "optim_step_cuda", lambda d: optim_step_section(d, plots, "_cuda")),
        (
            "Optimizer step (CUDA, ~1B params)",
            "optim_step_cuda_1b",
            lambda d: optim_step_section(d, plots, "_cuda_1b"),
        ),
        ("Scaling with parameter count (CPU)", "scaling", lambda d: scaling_section(d, plots)),
        ("Scaling with parameter count (CUDA)", "scaling_cuda", lambda d: scaling_section(d, plots, "_cuda")),
        ("Training memory", "memory", lambda d: memory_section(d, plots)),
        ("End-to-end throughput", "e2e", lambda d: e2e_section(d, plots)),
        ("End-to-end throughput (CUDA)", "e2e_cuda", lambda d: e2e_section(d, plots, "_cuda")),
        ("ZeRO sharding: ZeRO-1, DeepSpeed ZeRO-2 (+ offload)", "zero", zero_section),
        ("CPU offload", "offload", offload_section),
        (
            "8-bit state: training quality (paired, many seeds)",
            "quality_paired",
            lambda d: quality_paired_section(d, plots),
        ),
        (
            "8-bit state: each codec's error on a real run's moments",
            "codec_roundtrip",
            lambda d: codec_roundtrip_section(d, plots),
        ),
        ("8-bit state: what the codec does to the moments over many steps", "codec_bias", codec_bias_section),
        ("8-bit state: one demo run per state width", "quality_8bit", lambda d: quality_section(d, results)),
        ("GPU correctness check", "gpu_check", lambda d: gpu_check_section(d, docs["gpu_run"])),
    ]
    for title, name, fn in sections:
        parts += [f"## {title}", ""]
        doc = docs[name]
        if doc is None:
            gpu = "cuda" in name or name.startswith("gpu_")
            how = "`bash bench/gpu.sh` on a CUDA machine" if gpu else f"`bench/{name}.py`"
            parts += [f"Not run: `{name}.json` is not in the results (run {how}).", ""]
        else:
            parts += [fn(doc), ""]
    parts += [
        "## Reproduce",
        "",
        "```",
        "bash bench/run_all.sh          # all CPU benchmarks at full size, then this report",
        "bash bench/gpu.sh              # on a CUDA machine: correctness, optimizer step, bf16 step",
        "python bench/quality_paired.py # 8-bit vs 32-bit state over paired seeds (separate: hours)",
        "python bench/codec_roundtrip.py # each 8-bit codec on a real run's moments (separate: ~30 min)",
        "python bench/quality_8bit.py   # 32- vs 8-bit state on the demo fine-tune (separate: ~20 min)",
        "python bench/report.py         # regenerate BENCHMARKS.md and plots from bench/results/*.json",
        "```",
        "",
    ]
    return "\n".join(parts)


def update_headline(readme: Path, report: str) -> bool:
    """Replace the marked headline block of ``readme`` with the report's (if both have one)."""
    if not readme.exists() or HEADLINE_BEGIN not in report:
        return False
    text = readme.read_text()
    if HEADLINE_BEGIN not in text or HEADLINE_END not in text:
        return False
    block = report[report.index(HEADLINE_BEGIN) : report.index(HEADLINE_END) + len(HEADLINE_END)]
    head, rest = text.split(HEADLINE_BEGIN, 1)
    readme.write_text(head + block + rest.split(HEADLINE_END, 1)[1])
    return True


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--readme", type=Path, default=None, help="also update this file's headline block")
    args = parser.parse_args(argv)
    text = render(args.results)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    if args.readme is not None and update_headline(args.readme, text):
        print(f"updated the headline block of {args.readme}")
    return text


if __name__ == "__main__":
    main()
