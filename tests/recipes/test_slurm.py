"""launch/slurm.sbatch without SLURM: fake `scontrol` / `srun` and a fake launcher on PATH.

The fake launcher plays a training run: it records its arguments, and on SIGTERM writes the stop
record the recipes write ($SHARDWISE_STOP_FILE) and exits 1, as `accelerate launch` does when its
workers exit 75. The test sends the batch shell SLURM's warning signal (SIGUSR1) and checks that the
script forwards SIGTERM, requeues the job, and passes train.resume_from_checkpoint=auto.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ..helpers import ROOT

SBATCH = ROOT / "launch" / "slurm.sbatch"

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_LOG"
if [[ $1 == show && $2 == hostnames ]]; then echo node001; fi
"""
FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_LOG"
while [[ $1 == --* ]]; do shift; done
export SLURM_NODEID=0
exec "$@"
"""
FAKE_LAUNCHER = """#!/usr/bin/env bash
echo "launcher $*" >> "$FAKE_LOG"
case $FAKE_MODE in
  finish) exit 0 ;;
  crash) exit 1 ;;
esac
trap 'echo "launcher got TERM" >> "$FAKE_LOG"; echo "{\\"step\\": 7}" > "$SHARDWISE_STOP_FILE"; exit 1' TERM
echo started >> "$FAKE_LOG"
while true; do sleep 0.05; done
"""


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN), ("fake-accelerate", FAKE_LAUNCHER)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    bin_dir, log = _fake_bin(tmp_path), tmp_path / "log.txt"
    (tmp_path / "outputs").mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if k != "SHARDWISE_STOP_FILE"},
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "FAKE_MODE": mode,
        "ACCELERATE": str(bin_dir / "fake-accelerate"),
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[001-002]",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_SUBMIT_DIR": str(tmp_path),
    }
    args = [
        "bash",
        str(SBATCH),
        "recipes/finetune_gpt.py",
        "configs/recipes/gpt_tiny.yaml",
        "train.max_steps=9",
    ]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, log


def test_warning_signal_checkpoints_requeues_and_resumes(tmp_path):
    proc, log = _start(tmp_path, "wait")
    deadline = time.time() + 60
    while not (log.is_file() and "started" in log.read_text()):
        assert time.time() < deadline and proc.poll() is None, (
            proc.stdout.read() if proc.poll() is not None else ""
        )
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 delivers
    out = proc.communicate(timeout=60)[0]
    lines = log.read_text().splitlines()
    assert proc.returncode == 0, out
    assert "launcher got TERM" in lines and "scontrol requeue 4242" in lines, lines
    launch = next(ln for ln in lines if ln.startswith("launcher launch"))
    assert "--num_machines 2 --num_processes 8 --machine_rank 0" in launch
    assert "--main_process_ip node001" in launch
    # auto first (a fresh start or the latest checkpoint), the user's overrides after it (they win)
    assert launch.endswith("train.resume_from_checkpoint=auto train.max_steps=9"), launch
    assert "SIGUSR1 received" in out and "requeueing job 4242" in out and '"step": 7' in out, out


@pytest.mark.parametrize(("mode", "rc"), [("finish", 0), ("crash", 1)])
def test_finished_or_failed_run_is_not_requeued(tmp_path, mode, rc):
    proc, log = _start(tmp_path, mode)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == rc, out
    assert not any(ln.startswith("scontrol requeue") for ln in log.read_text().splitlines()), out


def test_sbatch_header_asks_for_the_warning_signal_and_requeue():
    head = [ln for ln in SBATCH.read_text().splitlines() if ln.startswith("#SBATCH")]
    assert "#SBATCH --signal=B:USR1@120" in head and "#SBATCH --requeue" in head
    assert "#SBATCH --open-mode=append" in head
