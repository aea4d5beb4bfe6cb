"""Checkpoints with ``Accelerator.save_state``: every N optimizer steps, keep the last K, resume.

A checkpoint is ``<output_dir>/checkpoints/step_0000120/``: what ``save_state`` writes (model,
optimizer, LR scheduler, RNG states, sampler) plus ``progress.json`` with the optimizer step it was
taken at. Resuming loads it all back, so the step count, the schedule and the data order continue
where they stopped. A sharded shardwise optimizer (``shard=True``) gathers its full state in
``state_dict()``, so a run saved on N processes resumes on M.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first (a half-written one has no progress.json)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / "progress.json").is_file()]


def save_checkpoint(accelerator, output_dir: str | Path, step: int, keep_last: int) -> Path:
    """Save the full training state at optimizer step ``step``; delete all but the newest ``keep_last``.

    Collective: every process must call it (sharded optimizer state and DeepSpeed gather inside).
    """
    path = checkpoints_dir(output_dir) / f"step_{step:07d}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / "progress.json").write_text(json.dumps({"step": step}) + "\n")
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def find_checkpoint(output_dir: str | Path, spec: str) -> Path:
    """``latest`` -> newest checkpoint under ``output_dir``; otherwise ``spec`` is the checkpoint dir."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(
                f"train.resume_from_checkpoint=latest but {checkpoints_dir(output_dir)} has no checkpoint; "
                "set train.checkpoint_every to write some, or resume_from_checkpoint=null"
            )
        return found[-1]
    path = Path(spec)
    if not (path / "progress.json").is_file():
        raise FileNotFoundError(f"train.resume_from_checkpoint={spec!r} is not a checkpoint directory")
    return path


def load_checkpoint(accelerator, path: Path) -> int:
    """Restore the state saved at ``path``; returns the optimizer step it was taken at."""
    accelerator.load_state(str(path))
    return int(json.loads((path / "progress.json").read_text())["step"])
