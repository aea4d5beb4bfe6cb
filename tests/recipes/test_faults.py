"""Faults a real run meets, through the recipes: bad configs and data (one `error:` line, exit 2,
nothing overwritten), divergence, kill -9 during checkpoint saves, exact resume on 1 and 2 processes,
and a rank dying under 2 processes. Faults are injected the way a real run would meet them (a huge
learning rate, SIGKILL, an exception on one rank via SHARDWISE_TEST_FAULTS); see docs/reliability.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from shardwise.configfile import load_config
from shardwise.errors import exit_on_error
from shardwise.train.checkpoint import checkpoint_problem, find_checkpoint, list_checkpoints, read_latest

from ..helpers import ROOT, ensure_assets, metrics, recipe_cmd, run

FAST = ["train.report_to=[]", "train.progress=false"]
TINY = str(ROOT / "configs" / "recipes" / "bert_tiny.yaml")


@pytest.fixture(scope="module", autouse=True)
def _assets():
    ensure_assets("minilm", "reuters-r8")


def _recipe(name: str):
    """Import recipes/<name>.py as a module (to call its main in-process)."""
    key = f"_recipe_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "recipes" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def _main_error(capsys, *overrides: str) -> str:
    """Run finetune_bert's main in-process as the CLI does; return its stderr (it must exit 2)."""
    from accelerate.state import AcceleratorState

    bert = _recipe("finetune_bert")
    AcceleratorState._reset_state(reset_partial_state=True)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info, exit_on_error():
        bert.main(load_config(bert.Config, TINY, [*FAST, *overrides]))
    AcceleratorState._reset_state(reset_partial_state=True)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # (after any progress bars of the data loading)
    assert "error: " in err and "Traceback" not in err, err
    lines = err[err.rindex("error: ") :].strip().splitlines()
    assert len(lines) <= 2 and (len(lines) == 1 or lines[1].startswith("hint: ")), err
    return "\n".join(lines)


def _csv(path, rows):
    path.write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    return str(path)


# ----------------------------------------------------------------------------------------------------
# clear errors


@pytest.mark.slow
def test_cli_errors_one_line_exit_2(tmp_path):
    """From the command line: a wrong type and a missing data file; `error:` + `hint:`, exit 2."""
    for overrides, expected in [
        (["train.batch_size=abc"], "train.batch_size: expected int, got 'abc'"),
        (["data.data_files.train=/nonexistent/train.csv"], "file not found: /nonexistent/train.csv"),
    ]:
        cmd = recipe_cmd(
            "finetune_bert.py", "bert_tiny.yaml", f"train.output_dir={tmp_path}", *FAST, *overrides
        )
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert lines[-2].startswith("error: ") and expected in lines[-2], proc.stderr[-3000:]
        assert lines[-1].startswith("hint: ") and "Traceback" not in proc.stderr


def test_bad_values_data_and_output_dir(tmp_path, capsys):
    out = f"train.output_dir={tmp_path / 'run'}"
    # invalid values, with the key
    assert "optimizer: lr must be a finite number > 0, got -0.001" in _main_error(
        capsys, "optimizer.lr=-1e-3"
    )
    assert "batch_size must be >= 1, got 0" in _main_error(capsys, "train.batch_size=0")
    err = _main_error(capsys, out, "optimizer.warmup_steps=20")
    assert "optimizer.warmup_steps=20 is not below the run's 8 optimizer steps" in err
    # data: a missing column, labels out of range, an empty split
    err = _main_error(capsys, out, "data.text_column=body")
    assert "data.text_column: column 'body' not in " in err and "train.csv; it has ['label', 'text']" in err
    files = f"data.data_files={{train: {_csv(tmp_path / 'neg.csv', [('a', 0), ('b', 1), ('c', -1)] * 8)}}}"
    err = _main_error(capsys, out, files, "data.eval_split=train")
    assert "labels out of range in the 'train' split: [-1]" in err and "unlabeled test split" in err
    (tmp_path / "empty.csv").write_text("text,label\n")
    err = _main_error(
        capsys, out, f"data.data_files={{train: {tmp_path / 'empty.csv'}}}", "data.eval_split=train"
    )
    assert "data.train_split='train' is empty" in err or "empty" in err
    # an output folder holding another run's checkpoints: refused, left as it was
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000004"
    ckpt.mkdir(parents=True)
    (ckpt / "progress.json").write_text('{"step": 4}\n')
    err = _main_error(capsys, out)
    assert "already holds another run's checkpoints (step_0000004)" in err and "overwrite=true" in err
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == [
        "checkpoints",
        "progress.json",
        "step_0000004",
    ]


# ----------------------------------------------------------------------------------------------------
# divergence


@pytest.mark.slow
def test_huge_lr_diverges_stops_and_keeps_last_good_checkpoint(tmp_path):
    """lr 1e30: the first update is applied (and checkpointed), the next ones overflow; after 3 skipped
    updates the run stops with the remedies, exit 2, and step 1's checkpoint is the one kept."""
    out = tmp_path / "run"
    cmd = recipe_cmd(
        "finetune_bert.py",
        "bert_tiny.yaml",
        f"train.output_dir={out}",
        "optimizer.lr=1e30",
        "optimizer.warmup_steps=0",
        "train.max_grad_norm=null",
        "train.max_consecutive_skips=3",
        "train.checkpoint_every=1",
        "train.keep_last=1",
        *FAST,
    )
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "update skipped" in proc.stdout and "Traceback" not in proc.stderr
    error = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(error) == 1 and "training diverged: the last 3 optimizer steps" in error[0], proc.stderr
    assert "lower the learning rate" in proc.stderr and "amsgrad" in proc.stderr
    good = find_checkpoint(out, "latest")
    assert [p.name for p in list_checkpoints(out)] == [good.name] and checkpoint_problem(good) is None
    weights = torch.load(good / "optimizer.bin", weights_only=False)["state"]
    assert all(torch.isfinite(t).all() for s in weights.values() for t in s.values() if torch.is_tensor(t))


@pytest.mark.slow
def test_nan_on_one_rank_skips_on_all_ranks_and_stops(tmp_path):
    """cpu_ddp x2, rank 1's loss turns NaN from step 3: DDP's all-reduce carries the NaN gradients to
    rank 0, both ranks skip the same updates, stop together after 3, and step 2's checkpoint stays."""
    out = tmp_path / "run"
    cmd = recipe_cmd(
        "finetune_bert.py",
        "bert_tiny.yaml",
        f"train.output_dir={out}",
        "train.max_consecutive_skips=3",
        "train.checkpoint_every=1",
        "train.keep_last=1",
        "train.collective_timeout_s=60",
        *FAST,
        accelerate_config="cpu_ddp.yaml",
    )
    env = {
        **os.environ,
        "SHARDWISE_TEST_FAULTS": "nan_loss_from=3,nan_rank=1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    # Whichever rank reports first (the launcher then stops the other), it names the same steps:
    # the NaN of rank 1 reached rank 0 through the gradient all-reduce.
    diverged = "training diverged: the last 3 optimizer steps (3..5)"
    assert diverged in output and "DivergenceError" not in output, output[-3000:]
    assert "update skipped (2 so far)" in proc.stdout, output[-3000:]  # rank 0 saw the skips too
    good = find_checkpoint(out, "latest")
    assert good.name == "step_0000002" and checkpoint_problem(good) is None
    assert [p.name for p in list_checkpoints(out)] == [good.name]
    weights = torch.load(good / "optimizer.bin", weights_only=False)["state"]
    assert all(torch.isfinite(t).all() for s in weights.values() for t in s.values() if torch.is_tensor(t))


# ----------------------------------------------------------------------------------------------------
# exact resume


def _losses(out):
    return {r["step"]: r["train/loss"] for r in metrics(out)["history"] if "train/loss" in r}


RESUME = [
    "data.max_train_samples=64",  # 4 updates per epoch on 1 process, 2 on 2: resumes cross epochs
    "train.max_steps=8",
    "train.checkpoint_every=2",
    "train.keep_last=4",
    "train.log_every=1",
    "train.eval_every=4",
    "optimizer.state_bits=8",
    *FAST,
]


@pytest.mark.slow
def test_exact_resume_two_processes_sharded_8bit(tmp_path):
    """cpu_ddp x2, ZeRO-1 sharded 8-bit state, dropout on: resumed runs repeat the losses exactly."""
    full = tmp_path / "full"
    common = [*RESUME, "optimizer.shard=true"]
    run(
        recipe_cmd(
            "finetune_bert.py",
            "bert_tiny.yaml",
            f"train.output_dir={full}",
            *common,
            accelerate_config="cpu_ddp.yaml",
        )
    )
    for ckpt in ("step_0000004", "step_0000006"):  # mid-epoch would need an odd step: 2/epoch
        resumed = tmp_path / f"from_{ckpt}"
        overrides = [
            f"train.output_dir={resumed}",
            f"train.resume_from_checkpoint={full / 'checkpoints' / ckpt}",
        ]
        run(
            recipe_cmd(
                "finetune_bert.py", "bert_tiny.yaml", *overrides, *common, accelerate_config="cpu_ddp.yaml"
            )
        )
        a, b = _losses(full), _losses(resumed)
        assert b and all(b[s] == a[s] for s in b), (ckpt, a, b)


# ----------------------------------------------------------------------------------------------------
# kill -9 during checkpoint saves


@pytest.mark.slow
def test_kill9_during_saves_always_resumes_intact(tmp_path):
    """8 trials: start (or resume "latest"), wait until a checkpoint save is under way, SIGKILL after a
    seeded random delay inside the (slowed) save; then "latest" must name a complete checkpoint. A
    last resume finishes the run, whose weights must equal an uninterrupted run's bit for bit."""
    rng = random.Random(1234)
    trials, steps = 8, 12
    common = [
        f"train.max_steps={steps}",
        "train.checkpoint_every=1",
        "train.keep_last=2",
        "train.eval_every=100",
        *FAST,
    ]
    ref = tmp_path / "reference"
    run(recipe_cmd("finetune_bert.py", "bert_tiny.yaml", f"train.output_dir={ref}", *common))

    out = tmp_path / "faulted"
    env = {**os.environ, "SHARDWISE_TEST_FAULTS": "slow_save=0.1", "TOKENIZERS_PARALLELISM": "false"}
    log, kills, pointer_bad, lost = [], 0, 0, 0
    for trial in range(trials):
        resume = (
            ["train.resume_from_checkpoint=latest"] if list_checkpoints(out) else ["train.overwrite=true"]
        )
        cmd = recipe_cmd("finetune_bert.py", "bert_tiny.yaml", f"train.output_dir={out}", *common, *resume)
        before = _step(find_checkpoint(out, "latest")) if list_checkpoints(out) else 0
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wanted, seen, deadline = rng.randint(1, 2), set(), time.time() + 240
        while len(seen) < wanted and proc.poll() is None and time.time() < deadline:
            root = out / "checkpoints"
            if root.is_dir():
                seen |= {p.name for p in root.iterdir() if p.name.startswith(".tmp-step_")}
            time.sleep(0.01)
        delay = rng.uniform(0.0, 0.7)  # the slowed save spans ~0.6 s (6 stages x 0.1 s) plus the writes
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        latest = read_latest(out)  # None until the first save completed
        pointer_bad += latest is not None and checkpoint_problem(latest) is not None
        # never behind the checkpoint that was complete before this trial started
        after = _step(find_checkpoint(out, "latest")) if list_checkpoints(out) else 0
        lost += after < before
        log.append(f"trial {trial}: SIGKILL {delay:.2f}s into save #{wanted}: step {before} -> {after}")
    run(
        recipe_cmd(
            "finetune_bert.py",
            "bert_tiny.yaml",
            f"train.output_dir={out}",
            *common,
            "train.resume_from_checkpoint=latest",
        )
    )
    from safetensors.torch import load_file

    a, b = load_file(ref / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print("\n" + "\n".join(log))
    print(
        f"kill -9 trials: {trials}, faults injected (SIGKILL mid-save): {kills}, "
        f"'latest' naming an incomplete checkpoint: {pointer_bad}, completed checkpoints lost: {lost}, "
        f"final weights identical to the uninterrupted run: {identical}"
    )
    assert kills >= trials - 1 and pointer_bad == 0 and lost == 0 and identical


def _step(path) -> int:
    return int(json.loads((path / "progress.json").read_text())["step"])


# ----------------------------------------------------------------------------------------------------
# a rank dies


@pytest.mark.slow
def test_rank_death_ends_the_run_within_a_bound(tmp_path):
    """cpu_ddp x2, rank 1 raises at step 3: the launcher must exit non-zero within 60 s of the fault."""
    cmd = recipe_cmd(
        "finetune_bert.py",
        "bert_tiny.yaml",
        f"train.output_dir={tmp_path}",
        "train.collective_timeout_s=30",
        *FAST,
        accelerate_config="cpu_ddp.yaml",
    )
    env = {
        **os.environ,
        "SHARDWISE_TEST_FAULTS": "raise_at=3,raise_rank=1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    t_fault, tail = None, []
    for line in proc.stdout:
        tail = [*tail[-40:], line]
        if t_fault is None and "injected failure on rank 1 at step 3" in line:
            t_fault = time.time()
    rc = proc.wait(timeout=300)
    assert t_fault is not None, "".join(tail)
    after = time.time() - t_fault
    print(f"\nrank 1 raised at step 3; launcher exited {rc} {after:.1f}s later")
    assert rc != 0 and after < 60, "".join(tail)
