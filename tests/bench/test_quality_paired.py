"""The paired 8-bit quality comparison, CI-sized: a codec regression must fail here.

``bench/quality_paired.py`` answers "does 8-bit state cost quality?" on real fine-tunes (1-2 hours of
CPU). This is its small version: a student MLP learning a fixed random teacher, 5 seeds, each seed
trained twice from the same init on the same batches, once with 32-bit and once with 8-bit state;
the mean paired difference of the held-out loss and its 95% t-interval (the benchmark's own
``paired_summary``) must lie within ``BOUND`` of the 32-bit loss.

Calibration (torch 2.13, CPU): the working codec measures -0.10% [-0.18, -0.03] (mean relative
difference [95% CI]); a second-moment codec with less range (the first moment's square-root map
for v) -1.2% [-1.9, -0.5]; a linear v map diverges. ``BOUND`` = 0.5% on both ends of the interval
sits between them, and ``test_a_worse_codec_fails_the_bound`` shows that the check catches both
broken codecs. (On inputs of equal feature scale all three stayed inside the bound: too easy a task
to tell codecs apart.)
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from shardwise.optim import AdamW, quant

from ..helpers import ensure_assets, run

BENCH = Path(__file__).resolve().parents[2] / "bench"
SEEDS = range(5)
STEPS, BATCH, DIM, HIDDEN, CLASSES = 150, 64, 64, 128, 10
BOUND = 0.005  # relative to the 32-bit held-out loss; see the module docstring


@functools.cache
def _bench_module_named(name: str):
    sys.path.insert(0, str(BENCH))  # the bench scripts import bench/common.py
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _bench_module():
    return _bench_module_named("quality_paired")


def _student(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # 64x128 and 128x128 weights have 8-bit state (>= 4,096 elements); the head and biases stay fp32
    return torch.nn.Sequential(
        torch.nn.Linear(DIM, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, CLASSES),
    )  # fmt: skip


def _data(seed: int):
    g = torch.Generator().manual_seed(1000 + seed)
    teacher = torch.randn(DIM, CLASSES, generator=g)
    x = torch.randn(STEPS * BATCH + 2048, DIM, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(x.shape[0], CLASSES, generator=g)).argmax(-1)
    # Features of unequal scale (log-normal, as real inputs and activations are): within one block
    # of the first layer's state, the second moments then span orders of magnitude, which is where
    # a codec's range shows. With equal scales even a linear v map passes (measured).
    x = x * torch.exp(torch.randn(DIM, generator=torch.Generator().manual_seed(7)))
    return x[: STEPS * BATCH], y[: STEPS * BATCH], x[STEPS * BATCH :], y[STEPS * BATCH :]


def _held_out_loss(seed: int, state_bits: int, impl: str = "auto") -> float:
    x, y, x_eval, y_eval = _data(seed)
    model = _student(seed)
    opt = AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, state_bits=state_bits, impl=impl)
    for i in range(STEPS):
        batch = slice(i * BATCH, (i + 1) * BATCH)
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x_eval), y_eval).item()


def _paired(state_bits_impl: tuple[int, str]) -> dict:
    bits, impl = state_bits_impl
    base = [_held_out_loss(s, 32, impl) for s in SEEDS]
    cand = [_held_out_loss(s, bits, impl) for s in SEEDS]
    return _bench_module().paired_summary(cand, base)


def _within_bound(r: dict) -> bool:
    return max(abs(r["rel_low"]), abs(r["rel_high"])) < BOUND


def test_paired_summary_statistics():
    r = _bench_module().paired_summary([1.1, 1.2, 0.9, 1.0], [1.0, 1.0, 1.0, 1.0])
    assert r["n"] == 4 and r["mean_diff"] == pytest.approx(0.05)
    sd = torch.tensor([0.1, 0.2, -0.1, 0.0], dtype=torch.float64).std().item()
    half = 3.182 * sd / 2  # t(0.975, 3) * sd / sqrt(4)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.05 - half, 0.05 + half))
    assert r["rel_mean"] == pytest.approx(0.05)
    assert r["median_diff"] == pytest.approx(0.05) and r["below"] == 1
    assert r["mean_abs_diff"] == pytest.approx(0.1)  # |0.1| + |0.2| + |-0.1| + |0| over 4: no cancelling
    # one outlying seed moves the mean, not the median or the count below 0
    r = _bench_module().paired_summary([9.0, 0.9, 0.8, 0.95], [1.0, 1.0, 1.0, 1.0])
    assert r["mean_diff"] > 1 and r["median_diff"] == pytest.approx(-0.075) and r["below"] == 3


def test_runs_merge_across_processes(tmp_path):
    """Processes sharing the JSON (one per task or per range of seeds) add their runs to the stored
    ones; a rerun of the same (task, candidate, seed) replaces its run; changed task settings, or
    --fresh, make the task's stored runs stale."""
    bench = _bench_module()
    out = tmp_path / "q.json"

    def doc(settings: dict, *keys: tuple) -> dict:
        runs = [
            {
                "task": "t",
                "candidate": c,
                "seed": seed,
                "status": "ok",
                "eval_loss": loss,
                "train_loss": [loss],
            }
            for c, seed, loss in keys
        ]
        return {"config": {"quick": True}, "tasks": {"t": settings}, "runs": runs}

    def stored() -> dict:
        return {(r["candidate"], r["seed"]): r["eval_loss"] for r in json.loads(out.read_text())["runs"]}

    base = {"lr": 1.0}
    bench._save(out, doc(base, ("shardwise_32bit", 0, 1.0), ("shardwise_8bit", 0, 1.1)))
    bench._save(out, doc(base, ("shardwise_32bit", 1, 2.0), ("shardwise_8bit", 1, 2.2)))
    merged = bench._save(out, doc(base, ("shardwise_8bit", 0, 1.05)))
    assert stored() == {
        ("shardwise_32bit", 0): 1.0,
        ("shardwise_8bit", 0): 1.05,
        ("shardwise_32bit", 1): 2.0,
        ("shardwise_8bit", 1): 2.2,
    }
    assert merged["summary"]["t"]["shardwise_8bit"]["n"] == 2
    bench._save(out, doc({"lr": 2.0}, ("shardwise_32bit", 0, 3.0)))
    assert stored() == {("shardwise_32bit", 0): 3.0}
    bench._save(out, doc({"lr": 2.0}, ("shardwise_8bit", 0, 3.3)), drop_tasks=("t",))
    assert stored() == {("shardwise_8bit", 0): 3.3}


def test_lr_control_and_task_variants():
    """The lr x1.05 control is shardwise 32-bit with a 5% larger lr; a task run at another lr or eps
    is stored under its own name, so it never replaces the default's runs; the 200-step SmolLM2
    task is the default at another step count."""
    bench = _bench_module()
    model = torch.nn.Linear(64, 64)
    control = bench.make_optimizer("shardwise_32bit_lr105", model, bench.SMOLLM2)
    assert [g["lr"] for g in control.param_groups] == pytest.approx([1.05 * bench.SMOLLM2.lr] * 2)
    assert control.state_bits == 32
    assert bench.make_optimizer("shardwise_8bit", model, bench.SMOLLM2).state_bits == 8
    settings, _ = bench.task_settings("smollm2", lr=1.2e-3)
    assert (settings.task, settings.lr, settings.max_steps) == ("smollm2_lr0.0012", 1.2e-3, 30)
    settings, _ = bench.task_settings("smollm2", lr=1.2e-3, eps=1e-6)
    assert (settings.task, settings.lr, settings.eps) == ("smollm2_lr0.0012_eps1e-06", 1.2e-3, 1e-6)
    assert bench.task_settings("smollm2")[0] == bench.SMOLLM2
    long, cls = bench.task_settings("smollm2_200")
    assert cls is bench.SmolLM2 and long.max_steps == 200
    assert replace(long, task="smollm2", max_steps=30) == bench.SMOLLM2


def test_simulated_codec_replaces_the_moments_after_every_step():
    """The simulation candidates: after each step the chosen moments of every tensor of at least
    4,096 elements are what the codec gave back; smaller tensors and the other moment stay exact."""
    bench = _bench_module()
    model = torch.nn.Linear(64, 64)  # a 4,096-element weight, a 64-element bias
    opt = bench.state_through_codec(
        AdamW(model.parameters(), lr=1e-3), lambda x, signed: torch.full_like(x, 7.0), ("exp_avg_sq",)
    )
    model(torch.randn(8, 64)).square().mean().backward()
    opt.step()
    weight, bias = opt.state[model.weight], opt.state[model.bias]
    assert torch.all(weight["exp_avg_sq"] == 7.0) and not torch.any(weight["exp_avg"] == 7.0)
    assert not torch.any(bias["exp_avg_sq"] == 7.0)


def test_report_renders_an_lr_and_eps_sweep_apart(tmp_path):
    """Tasks run at another --lr or --eps are summarised in one table (mean 32-bit eval loss per
    setting, against the task's own on the same seeds); one with the baseline alone gets no empty
    paired table, one with other candidates gets its paired table too."""
    bench = _bench_module()
    sys.path.insert(0, str(BENCH))
    import report

    def run(task, candidate, seed, loss):
        return {"task": task, "candidate": candidate, "seed": seed, "status": "ok", "eval_loss": loss,
                "train_loss": [loss]}  # fmt: skip

    settings = json.loads(json.dumps(asdict(bench.SMOLLM2)))
    swept = json.loads(json.dumps(asdict(bench.task_settings("smollm2", lr=6e-4)[0])))
    runs = [run("smollm2", c, s, 4.0 + s / 10) for c in ("shardwise_32bit", "shardwise_8bit") for s in (0, 1)]
    runs += [run("smollm2_lr0.0006", "shardwise_32bit", s, 4.3 + s / 10) for s in (0, 1, 2)]
    eps = json.loads(json.dumps(asdict(bench.task_settings("smollm2", eps=1e-6)[0])))
    runs += [run("smollm2_eps1e-06", c, s, 4.2 + s / 10) for c in ("shardwise_32bit", "bnb_8bit")
             for s in (0, 1)]  # fmt: skip
    tasks = {"smollm2": settings, "smollm2_lr0.0006": swept, "smollm2_eps1e-06": eps}
    doc = {"config": {"quick": False}, "tasks": tasks, "runs": runs}
    bench.summarize(doc)
    doc["machine"] = {}
    text = report.quality_paired_section(doc, tmp_path)
    assert "| smollm2 | lr 0.0006 (task's 0.0002) | 0 1 | 4.3500 | 4.0500 | +0.3000 (0/2) |" in text
    assert "| smollm2 | eps 1e-06 (task's 1e-08) | 0 1 | 4.2500 | 4.0500 | +0.2000 (0/2) |" in text
    assert "**smollm2_lr0.0006**" not in text and "**smollm2**" in text
    assert "**smollm2_eps1e-06**" in text and "eps 1e-06, weight decay" in text


def test_distance_from_32bit_counts_both_sides(tmp_path):
    """A candidate that ends below 32-bit on one seed and above on another has a signed mean of 0
    but a mean absolute difference that counts both; against shardwise 8-bit the summary pairs the
    distances seed by seed, and the report names whose is the larger."""
    bench = _bench_module()
    sys.path.insert(0, str(BENCH))
    import report

    losses = {  # seed -> 32-bit, ours, bitsandbytes'
        0: (4.0, 4.01, 3.9),
        1: (4.0, 3.99, 4.1),
        2: (4.0, 4.0, 4.0),
    }
    runs = [
        {"task": "smollm2", "candidate": c, "seed": seed, "status": "ok", "eval_loss": loss,
         "train_loss": [loss]}
        for seed, row in losses.items()
        for c, loss in zip(("shardwise_32bit", "shardwise_8bit", "bnb_8bit"), row, strict=True)
    ]  # fmt: skip
    doc = {"config": {"quick": False}, "tasks": {"smollm2": asdict(bench.SMOLLM2)}, "runs": runs}
    bench.summarize(doc)
    ours, theirs = doc["summary"]["smollm2"]["shardwise_8bit"], doc["summary"]["smollm2"]["bnb_8bit"]
    assert ours["mean_diff"] == pytest.approx(0) and ours["mean_abs_diff"] == pytest.approx(0.02 / 3)
    assert theirs["mean_diff"] == pytest.approx(0) and theirs["mean_abs_diff"] == pytest.approx(0.2 / 3)
    distance = theirs["distance_vs_shardwise_8bit"]
    assert distance["diffs"] == pytest.approx([0.09, 0.09, 0.0])
    doc["machine"] = {}
    text = report.quality_paired_section(doc, tmp_path)
    assert "bitsandbytes AdamW8bit +0.0600" in text and "(ours the closer on 2 of 3 seeds)" in text
    assert "| 0.0067 |" in text and "| 0.0667 |" in text  # the mean abs. difference column


def test_batches_past_one_epoch_reshuffle_and_keep_the_first():
    """A task of two epochs sees the one-epoch task's batches first, then a fresh shuffle."""
    bench = _bench_module()
    ds = list(range(10))

    def collate(xs):
        return {"x": torch.tensor(xs)}

    def draw(limit):
        return [b["x"].tolist() for b in bench._dataloader_batches(ds, 5, collate, 3, limit)]

    one, two = draw(None), draw(4)
    assert len(one) == 2 and len(two) == 4 and two[:2] == one
    assert sorted(two[2] + two[3]) == ds and two[2:] != one
    assert draw(1) == one[:1]


@pytest.mark.parametrize("impl", ["auto", "foreach"])
def test_8bit_state_trains_like_32bit(impl):
    r = _paired((8, impl))
    assert _within_bound(r), (
        f"8-bit state moved the held-out loss by {100 * r['rel_mean']:+.3f}% "
        f"[{100 * r['rel_low']:+.3f}, {100 * r['rel_high']:+.3f}] of the 32-bit loss "
        f"(bound +-{100 * BOUND}%): a codec regression? per-seed diffs {r['diffs']}"
    )


def _v_codec_with_root(k: int):
    """A second-moment codec with ``k``-th-root companding (the real one has k = 4) and one scale per
    row: ``c = round(255 (v / a)^(1/k))``, ``v' = a (c / 255)^k``. k = 2 (the first moment's map) has
    255^2 levels down to ``a / 65025``; k = 1 (linear) decodes every ``v < a / 510`` to 0."""

    def patch(monkeypatch):
        encode, decode = quant.encode, quant.decode

        def enc(x, signed):
            if signed:
                return encode(x, signed)
            rows = x.float().reshape(x.shape[0], -1)
            a = rows.abs().amax(-1, keepdim=True).clamp_min(1e-38)
            codes = torch.round(255 * (rows / a) ** (1 / k)).to(torch.uint8).reshape(x.shape)
            return codes, a.expand(-1, quant.scales_shape(x.shape)[1])

        def dec(codes, absmax, signed, dtype=torch.float32):
            if signed:
                return decode(codes, absmax, signed, dtype)
            q = codes.reshape(codes.shape[0], -1).float() / 255
            return (q**k * absmax[:, :1].float()).reshape(codes.shape).to(dtype)

        monkeypatch.setattr(quant, "encode", enc)
        monkeypatch.setattr(quant, "decode", dec)

    return patch


@pytest.mark.parametrize("root", [2, 1], ids=["sqrt_v", "linear_v"])
def test_a_worse_codec_fails_the_bound(monkeypatch, root):
    """The check has teeth: a v codec with less range (patched into the torch-ops codec that the
    foreach implementation uses) moves the held-out loss past the bound."""
    _v_codec_with_root(root)(monkeypatch)
    r = _paired((8, "foreach"))
    assert not _within_bound(r), f"a worse v codec passed: {r}"


def test_codec_bias_simulation_renders(tmp_path):
    """bench/codec_bias.py: a few steps within one decade of gradient scales leave the moments within
    0.5% of fp32 (the codec is close to unbiased once); the JSON renders."""
    doc = _bench_module_named("codec_bias").main(
        ["--decades", "1", "--steps", "10", "--codecs", "shardwise", "--out", str(tmp_path / "c.json")]
    )
    assert doc["status"] == {"shardwise": "ok"}
    assert {r["decile"] for r in doc["rows"]} == {"smallest 10%", "middle 10%", "largest 10%"}
    for r in doc["rows"]:
        for key in ("v8_over_v32", "m8_over_m32", "update_ratio"):
            assert abs(r[key] - 1) < 5e-3, r
    import report

    assert "update 8 / 32" in report.codec_bias_section(doc)


@pytest.mark.slow
def test_benchmark_quick_run_renders(tmp_path):
    """bench/quality_paired.py --quick (tiny random models) writes the JSON the report renders, and a
    rerun resumes: it keeps the stored runs instead of training them again."""
    ensure_assets("minilm", "reuters-r8", "smollm2", "shakespeare")  # tokenizers and data
    out = tmp_path / "quality_paired.json"
    cmd = [
        sys.executable,
        str(BENCH / "quality_paired.py"),
        "--quick",
        "--seeds",
        "0",
        "1",
        "--out",
        str(out),
    ]
    cmd += ["--candidates", "shardwise_32bit", "shardwise_8bit", "torch_fused"]
    run(cmd, timeout=900)
    doc = json.loads(out.read_text())
    assert {(r["task"], r["seed"], r["candidate"]) for r in doc["runs"]} == {
        (t, s, c)
        for t in ("minilm_r8", "smollm2")
        for s in (0, 1)
        for c in ("shardwise_32bit", "shardwise_8bit", "torch_fused")
    }
    assert all(r["status"] == "ok" and r["steps"] == 6 for r in doc["runs"])
    assert set(doc["summary"]["minilm_r8"]) == {"shardwise_8bit", "torch_fused"}
    assert doc["summary"]["minilm_r8"]["torch_fused"]["train_deviation"] >= 0
    proc = run(cmd, timeout=300)
    assert "runs to do" not in proc.stdout  # everything was kept
    sys.path.insert(0, str(BENCH))
    import report

    text = report.render(tmp_path, tmp_path)
    assert "eval loss - 32-bit [95% CI]" in text and "shardwise AdamW 8-bit" in text
    assert (tmp_path / "quality_paired.png").exists()


def test_trajectory_deviation():
    bench = _bench_module()
    assert bench.trajectory_deviation([1.0, 2.0, 3.0], [1.0, 2.5, 2.0]) == pytest.approx(0.5)


@pytest.mark.slow
def test_codec_roundtrip_quick_run(tmp_path):
    """bench/codec_roundtrip.py --quick: every codec is measured or says why not, and shardwise's
    one-step update error on a real run's moments stays small (a codec regression would not)."""
    ensure_assets("smollm2", "shakespeare")
    out = tmp_path / "codec_roundtrip.json"
    run([sys.executable, str(BENCH / "codec_roundtrip.py"), "--quick", "--out", str(out)], timeout=600)
    doc = json.loads(out.read_text())
    assert doc["status"]["shardwise"] == "ok"
    assert all(s == "ok" or s.startswith("unavailable: ") for s in doc["status"].values())
    assert len(doc["rows"]) == 3  # 4 quick steps; the first starts from zero state
    ours = doc["summary"]["shardwise"]
    assert 0 < ours["update_max"] < 0.02 and 0 < ours["m_max"] < 0.02 and 0 < ours["v_max"] < 0.02
    sys.path.insert(0, str(BENCH))
    import report

    text = report.codec_roundtrip_section(doc, tmp_path)
    assert "| shardwise |" in text and (tmp_path / "codec_roundtrip.png").exists()
