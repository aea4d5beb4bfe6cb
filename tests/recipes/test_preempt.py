"""Preemption through the recipes: a signal stops every process after the same optimizer step with a
checkpoint (exit 75), the resumed run ends with the uninterrupted run's weights bit for bit; a signal
during that save loses nothing; N -> M processes resume mid-epoch with the samples accounted for;
a disk filling up mid-save keeps the previous checkpoint; the divergence guard under DeepSpeed ZeRO-2.
See docs/reliability.md ("Preemption").
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import time

import pytest
import torch

from shardwise.train.checkpoint import checkpoint_problem, find_checkpoint, list_checkpoints, read_progress
from shardwise.train.preempt import EXIT_STOPPED

from ..helpers import ROOT, ensure_assets, recipe_cmd, run

FAST = ["train.report_to=[]", "train.progress=false"]
RECIPES = {"bert": ("finetune_bert.py", "bert_tiny.yaml"), "gpt": ("finetune_gpt.py", "gpt_tiny.yaml")}


@pytest.fixture(scope="module", autouse=True)
def _assets():
    ensure_assets("minilm", "reuters-r8", "smollm2", "shakespeare")


def _env(samples=None, faults=None, stop_file=None) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    for key in ("SHARDWISE_TEST_SAMPLES", "SHARDWISE_TEST_FAULTS", "SHARDWISE_STOP_FILE"):
        env.pop(key, None)
    if samples is not None:
        samples.mkdir(parents=True, exist_ok=True)
        env["SHARDWISE_TEST_SAMPLES"] = str(samples)
    if faults:
        env["SHARDWISE_TEST_FAULTS"] = faults
    if stop_file:
        env["SHARDWISE_STOP_FILE"] = str(stop_file)
    return env


def _records(samples) -> list[dict]:
    """Every micro-batch the processes trained on, from the SHARDWISE_TEST_SAMPLES logs."""
    out = []
    for f in sorted(samples.glob("rank*.jsonl")):
        rank = int(f.stem[4:])
        out += [{**json.loads(line), "rank": rank} for line in f.read_text().splitlines()]
    return out


def _weights(out) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "model" / "model.safetensors")


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _signal_when(proc, samples, step: int, target: str, sig=signal.SIGTERM, timeout=300.0) -> None:
    """Wait until a process logs a micro-batch of optimizer step ``step``; signal ``target``:
    "launcher" (proc itself) or "rank1" (that worker only)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        recs = _records(samples) if samples.is_dir() else []
        hit = [r for r in recs if r["step"] >= step]
        if hit and (target == "launcher" or any(r["rank"] == 1 for r in hit)):
            pid = proc.pid if target == "launcher" else next(r["pid"] for r in hit if r["rank"] == 1)
            os.kill(pid, sig)
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached (exit {proc.poll()})")


# ----------------------------------------------------------------------------------------------------
# SIGTERM at a random step -> checkpoint at that step -> resume -> identical weights


CASES = [("bert", 1, "launcher"), ("bert", 2, "rank1"), ("gpt", 1, "launcher"), ("gpt", 2, "launcher")]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three runs, two of them on 2 processes: slow on a loaded 2-core machine
@pytest.mark.parametrize(("recipe", "procs", "target"), CASES, ids=[f"{r}-x{n}-{t}" for r, n, t in CASES])
def test_sigterm_checkpoint_resume_identical(tmp_path, recipe, procs, target):
    """SIGTERM at a seeded random step (to the launcher, or to rank 1 only: the others must follow):
    every process stops after the same step, which is checkpointed, exit 75 (1 process) / a stop
    record; the same command with resume_from_checkpoint=auto finishes with the uninterrupted run's
    weights, bit for bit (8-bit state, ZeRO-1 sharded on 2 processes)."""
    script, config = RECIPES[recipe]
    steps = 12
    common = [f"train.max_steps={steps}", "train.checkpoint_every=5", "optimizer.state_bits=8", *FAST]
    if procs == 2:
        common.append("optimizer.shard=true")
    accel = "cpu_ddp.yaml" if procs == 2 else None
    ref = tmp_path / "reference"
    run(recipe_cmd(script, config, f"train.output_dir={ref}", *common, accelerate_config=accel))

    out, samples, stop_file = tmp_path / "run", tmp_path / "samples", tmp_path / "stopped.json"
    cmd = recipe_cmd(
        script,
        config,
        f"train.output_dir={out}",
        *common,
        "train.resume_from_checkpoint=auto",
        accelerate_config=accel,
    )
    at = random.Random(f"{recipe}{procs}").randint(2, steps - 3)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=_env(samples, stop_file=stop_file),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    t0 = time.time()
    _signal_when(proc, samples, at, target)
    output = proc.communicate(timeout=300)[0]
    seconds = time.time() - t0
    if procs == 1:
        assert proc.returncode == EXIT_STOPPED, output[-3000:]
    else:  # the launcher reports the workers' exit 75 as its failure (1) or dies of the signal (143)
        assert proc.returncode in (1, 128 + signal.SIGTERM), output[-3000:]
        assert "exitcode  : 75" in output or proc.returncode == 143, output[-3000:]
    assert "Traceback" not in output.split("ChildFailedError")[0] or procs == 2, output[-3000:]
    record = json.loads(stop_file.read_text())
    stopped = record["step"]
    assert at <= stopped < steps and record["signal"] == "SIGTERM", (at, record)
    ckpt = find_checkpoint(out, "latest")
    assert ckpt.name == f"step_{stopped:07d}" and checkpoint_problem(ckpt) is None
    assert output.count("stopped: SIGTERM: stopped at optimizer step") == 1, output[-3000:]
    assert "train.resume_from_checkpoint=auto" in output
    # every process stopped at the same step: no process trained on a later one
    recs = _records(samples)
    assert max(r["step"] for r in recs) == stopped and {r["rank"] for r in recs} == set(range(procs))
    print(
        f"\n{recipe} x{procs}: SIGTERM ({target}) during step >= {at}, stopped at {stopped}; {seconds:.1f}s"
    )

    run(cmd)  # the same command: resumes (auto), finishes
    assert _same_weights(ref, out)


# ----------------------------------------------------------------------------------------------------
# more signals during the save


@pytest.mark.slow
def test_signals_during_the_stop_save_lose_nothing(tmp_path):
    """SIGTERM, then, while the (slowed) checkpoint is being written, SIGTERM + SIGINT + SIGUSR1:
    acknowledged, the save completes, exit 75; the earlier periodic checkpoint is intact too."""
    out, samples = tmp_path / "run", tmp_path / "samples"
    cmd = recipe_cmd(
        "finetune_bert.py",
        "bert_tiny.yaml",
        f"train.output_dir={out}",
        "train.max_steps=12",
        "train.checkpoint_every=3",
        "train.keep_last=3",
        *FAST,
    )
    env = _env(samples, faults="slow_save=0.4")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _signal_when(proc, samples, 5, "launcher")
    root, deadline = out / "checkpoints", time.time() + 120
    while not (
        root.is_dir()
        and any(p.name.startswith(".tmp-step_") and "0003" not in p.name for p in root.iterdir())
    ):
        assert time.time() < deadline and proc.poll() is None, "the stop save did not start"
        time.sleep(0.01)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        time.sleep(0.2)
        proc.send_signal(sig)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == EXIT_STOPPED, output[-3000:]
    assert "again: finishing the checkpoint being written" in output and "Traceback" not in output, output
    done = list_checkpoints(out)
    assert done[0].name == "step_0000003" and all(checkpoint_problem(p) is None for p in done)
    assert find_checkpoint(out, "latest") == done[-1] and read_progress(done[-1])["step"] >= 5
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


# ----------------------------------------------------------------------------------------------------
# N -> M processes, mid-epoch: every sample of the epoch trained on once


@pytest.fixture(scope="module")
def epoch_rows(tmp_path_factory) -> collections.Counter:
    """The rows of one full epoch of bert_tiny (256 texts), from an uninterrupted 1-process run."""
    tmp = tmp_path_factory.mktemp("epoch")
    samples = tmp / "samples"
    cmd = recipe_cmd(
        "finetune_bert.py", "bert_tiny.yaml", f"train.output_dir={tmp / 'ref'}", "train.max_steps=null", *FAST
    )
    subprocess.run(cmd, cwd=ROOT, env=_env(samples), check=True, capture_output=True, timeout=900)
    rows = collections.Counter(row for r in _records(samples) for row in r["rows"])
    assert sum(rows.values()) == 256
    return rows


ELASTIC = [(2, 1, 3), (1, 2, 6), (1, 2, 5)]  # (processes before, after, stop step)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize(("before", "after", "at"), ELASTIC, ids=[f"{b}to{a}_at{s}" for b, a, s in ELASTIC])
def test_elastic_resume_mid_epoch_sample_accounting(tmp_path, epoch_rows, before, after, at):
    """One epoch (256 texts, 16 per process and micro-batch) stopped mid-epoch on N processes and
    finished on M: 2 -> 1 at step 3 and 1 -> 2 at step 6 train on every text exactly once; 1 -> 2 at
    step 5 (80 texts done, not a multiple of the 32-text global batch of 2 processes) rounds down:
    the 16 texts of the boundary batch are trained on twice (said on stdout), none skipped."""
    out, samples = tmp_path / "run", tmp_path / "samples"
    ddp = {1: None, 2: "cpu_ddp.yaml"}
    first = recipe_cmd(
        "finetune_bert.py",
        "bert_tiny.yaml",
        f"train.output_dir={out}",
        f"train.max_steps={at}",
        f"train.checkpoint_every={at}",
        *FAST,
        accelerate_config=ddp[before],
    )
    subprocess.run(first, cwd=ROOT, env=_env(samples / "a"), check=True, capture_output=True, timeout=900)
    second = recipe_cmd(
        "finetune_bert.py",
        "bert_tiny.yaml",
        f"train.output_dir={out}",
        "train.max_steps=null",
        "train.resume_from_checkpoint=latest",
        *FAST,
        accelerate_config=ddp[after],
    )
    proc = subprocess.run(
        second, cwd=ROOT, env=_env(samples / "b"), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    seen = collections.Counter(row for d in ("a", "b") for r in _records(samples / d) for row in r["rows"])
    again = at * 16 * before % (16 * after)
    assert not (epoch_rows - seen), f"{before}->{after} at {at}: samples skipped"
    extra = seen - epoch_rows
    assert sum(extra.values()) == again, (before, after, at, extra)
    if again:
        assert f"the first {again} of the next one are trained on a second time" in proc.stdout
    print(f"\n{before} -> {after} processes at step {at}: {sum(seen.values())} rows trained, {again} twice")


# ----------------------------------------------------------------------------------------------------
# disk full during a save


@pytest.mark.slow
def test_disk_full_mid_save_keeps_previous_checkpoint(tmp_path):
    """The 2nd save fails with ENOSPC after the state was written: one `error:` line naming the folder,
    the free and the needed space; exit 2; step 2's checkpoint intact and `latest`; no scratch left."""
    out = tmp_path / "run"
    cmd = recipe_cmd(
        "finetune_bert.py", "bert_tiny.yaml", f"train.output_dir={out}", "train.checkpoint_every=2", *FAST
    )
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(faults="disk_full_at_save=2"), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"no space left on the device of {out / 'checkpoints'}" in errors[0]
    assert "free, a checkpoint needs about" in errors[0] and "step_0000002 is intact" in errors[0]
    assert [p.name for p in list_checkpoints(out)] == ["step_0000002"]
    assert find_checkpoint(out, "latest").name == "step_0000002"
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


# ----------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-2: the divergence guard


@pytest.mark.slow
def test_deepspeed_zero2_nan_on_one_rank_skips_everywhere(tmp_path):
    """DeepSpeed ZeRO-2 x2 (fp32): rank 1's loss turns NaN from step 3. DeepSpeed finds the global
    gradient norm non-finite (all-reduced, so both ranks agree) and skips the step before the optimizer
    runs; the guard counts DeepSpeed's skips: both ranks stop after 3, step 2's checkpoint kept."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    cmd = recipe_cmd(
        "finetune_bert.py",
        "bert_tiny.yaml",
        f"train.output_dir={out}",
        "train.max_consecutive_skips=3",
        "train.checkpoint_every=1",
        "train.keep_last=1",
        "train.collective_timeout_s=120",
        *FAST,
        accelerate_config="deepspeed_zero2.yaml",
    )
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=_env(faults="nan_loss_from=3,nan_rank=1"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "training diverged: the last 3 optimizer steps (3..5)" in output, output[-3000:]
    assert "update skipped (2 so far)" in proc.stdout, output[-3000:]
    good = find_checkpoint(out, "latest")
    assert good.name == "step_0000002" and checkpoint_problem(good) is None
