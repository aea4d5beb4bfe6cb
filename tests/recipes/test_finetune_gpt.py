"""finetune_gpt: the tiny config on 1 process and on 2 (cpu_ddp, ZeRO-1 sharded 8-bit)."""

from __future__ import annotations

import math

import pytest

from ..helpers import ensure_assets, metrics, recipe_cmd, run

FAST = ["train.report_to=[]", "train.progress=false"]


@pytest.fixture(scope="module", autouse=True)
def _assets():
    ensure_assets("smollm2", "shakespeare")


def _check(out):
    m = metrics(out)
    final = m["final"]
    assert final["steps"] == 8
    assert math.isclose(final["eval/perplexity"], math.exp(final["eval/loss"]), rel_tol=1e-6)
    losses = [r["train/loss"] for r in m["history"] if "train/loss" in r]
    assert losses[-1] < losses[0], losses  # 8 steps at lr 3e-3 visibly learn token frequencies
    assert (out / "samples.txt").read_text().startswith("ROMEO:")
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()
    return m


@pytest.mark.slow
def test_tiny_one_process(tmp_path):
    out = tmp_path / "run"
    proc = run(recipe_cmd("finetune_gpt.py", "gpt_tiny.yaml", f"train.output_dir={out}"))
    _check(out)
    assert "--- sample ---" in proc.stdout and "perplexity" in proc.stdout
    assert list((out / "logs").rglob("events.out.tfevents.*")), "TensorBoard events were not written"


@pytest.mark.slow
def test_tiny_two_processes_sharded_8bit(tmp_path):
    out = tmp_path / "run"
    cmd = recipe_cmd(
        "finetune_gpt.py",
        "gpt_tiny.yaml",
        f"train.output_dir={out}",
        "optimizer.shard=true",
        "optimizer.state_bits=8",
        *FAST,
        accelerate_config="cpu_ddp.yaml",
    )
    proc = run(cmd)
    assert "MULTI_CPU x2" in proc.stdout
    _check(out)
