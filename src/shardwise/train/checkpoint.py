"""Crash-safe checkpoints with ``Accelerator.save_state``: every N optimizer steps, keep the last K, resume.

A checkpoint is ``<output_dir>/checkpoints/step_0000120/``: what ``save_state`` writes (model,
optimizer, LR scheduler, RNG states, sampler) plus ``progress.json`` (the optimizer step, a manifest of
every file with its size, and any recipe metadata). Resuming loads it all back, so the step count, the
schedule and the data order continue where they stopped. A sharded shardwise optimizer
(``shard=True``) gathers its full state in ``state_dict()``, so a run saved on N processes resumes on M.

Atomicity (a ``kill -9`` or power cut at any moment leaves a resumable folder):

1. every process writes into ``checkpoints/.tmp-step_0000120/``; the main process adds
   ``progress.json`` last and fsyncs the files and the folder;
2. ``os.replace`` renames it to ``step_0000120`` (atomic on POSIX): a ``step_*`` folder is complete;
3. ``checkpoints/latest`` (one line, the folder name) is rewritten through a temporary file +
   ``os.replace``, so it only ever names a complete checkpoint;
4. rotation renames old checkpoints to ``.trash-*`` before deleting them, and never touches the one
   just written; leftover ``.tmp-*`` / ``.trash-*`` folders from a crash are removed at the next save.

``find_checkpoint(out, "latest")`` follows the pointer after checking the manifest (files present,
sizes equal); if the pointer is missing or names a damaged folder it falls back to the newest complete
``step_*`` and says so. ``"auto"`` does the same but starts fresh (None) when there is no complete
checkpoint: one command serves a first start and every requeue of a preempted job.

A disk filling up during a save (ENOSPC) removes the partial ``.tmp-*`` folder, leaves the previous
checkpoint as it was, and raises a :class:`CheckpointError` naming the folder, the free space and the
space a checkpoint needs.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardwise.errors import CheckpointError

from . import faults
from .plan import DataPosition

PROGRESS = "progress.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_SCRATCH = (".tmp-", ".trash-")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


# ----------------------------------------------------------------------------------------------------
# validation and lookup


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a complete checkpoint (None when it is): progress.json and its manifest."""
    path = Path(path)
    if not path.is_dir():
        return "no such directory"
    try:
        progress = json.loads((path / PROGRESS).read_text())
        int(progress["step"])
    except FileNotFoundError:
        return f"no {PROGRESS} (an unfinished save?)"
    except (ValueError, KeyError, TypeError):
        return f"{PROGRESS} is damaged"
    for name, size in progress.get("files", {}).items():  # checkpoints from before the manifest: none
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first (half-written or damaged ones are skipped)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if checkpoint_problem(p) is None]


def read_latest(output_dir: str | Path) -> Path | None:
    """The checkpoint ``checkpoints/latest`` names (None without a pointer); not validated."""
    pointer = checkpoints_dir(output_dir) / LATEST
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError:
        return None
    return checkpoints_dir(output_dir) / name if _STEP_DIR.match(name) else None


def find_checkpoint(output_dir: str | Path, spec: str) -> Path | None:
    """``latest`` -> the checkpoint ``checkpoints/latest`` names (or the newest complete one if the
    pointer is missing or damaged); ``auto`` -> the same, or None when there is no complete checkpoint
    (start fresh); otherwise ``spec`` is a checkpoint directory, checked complete."""
    if spec == "auto":
        return find_checkpoint(output_dir, "latest") if list_checkpoints(output_dir) else None
    if spec == "latest":
        pointed = read_latest(output_dir)
        if pointed is not None and checkpoint_problem(pointed) is None:
            return pointed
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(
                f"train.resume_from_checkpoint=latest but {checkpoints_dir(output_dir)} has no complete "
                "checkpoint",
                hint="set train.checkpoint_every to write some, train.resume_from_checkpoint=auto to start "
                "fresh when there is none, or train.resume_from_checkpoint=null",
            )
        if pointed is not None:
            print(
                f"warning: checkpoints/latest names {pointed.name} ({checkpoint_problem(pointed)}); "
                f"using the newest complete checkpoint, {found[-1].name}",
                file=sys.stderr,
            )
        return found[-1]
    path = Path(spec)
    problem = checkpoint_problem(path)
    if problem is not None:
        complete = [p.name for p in list_checkpoints(path.parent.parent)] if path.parent.name else []
        raise CheckpointError(
            f"train.resume_from_checkpoint={spec!r} is not a checkpoint directory ({problem})",
            hint=f"complete checkpoints next to it: {complete}" if complete else "use 'latest' or a step_*",
        )
    return path


def read_progress(path: str | Path) -> dict[str, Any]:
    """progress.json of a checkpoint: ``step``, ``files`` and the recipe's ``meta``."""
    return json.loads((Path(path) / PROGRESS).read_text())


@dataclass(frozen=True)
class Resumed:
    """What a run continues from (all zero / None for a fresh start)."""

    path: Path | None = None
    step: int = 0
    skipped_steps: int = 0
    train_seconds: float = 0.0
    position: DataPosition | None = None  # samples consumed (None: fresh, or an older checkpoint)


def resume_point(output_dir: str | Path, spec: str | None) -> Resumed:
    """What the checkpoint ``spec`` names (``latest``, ``auto``, a path; None = fresh) resumes from:
    read from its progress.json, nothing loaded yet (the step plan needs it before the optimizer and
    schedule are built; :func:`load_checkpoint` loads the state once they are prepared)."""
    path = find_checkpoint(output_dir, spec) if spec is not None else None
    if path is None:
        return Resumed()
    progress = read_progress(path)
    meta = progress.get("meta", {})
    data = meta.get("data")
    return Resumed(
        path,
        int(progress["step"]),
        meta.get("skipped_steps", 0),
        meta.get("train_seconds", 0.0),
        DataPosition(int(data["epoch"]), int(data["samples"])) if data else None,
    )


# ----------------------------------------------------------------------------------------------------
# saving


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _remove(path: Path) -> None:
    """Rename ``path`` out of the ``step_*`` namespace first, so a crash never leaves half a checkpoint."""
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    faults.pause("rotate")
    shutil.rmtree(trash, ignore_errors=True)


def clean_scratch(output_dir: str | Path) -> None:
    """Remove the ``.tmp-*`` / ``.trash-*`` folders a crashed save or rotation left behind."""
    root = checkpoints_dir(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(_SCRATCH):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


def save_checkpoint(
    accelerator,
    output_dir: str | Path,
    step: int,
    keep_last: int,
    *,
    meta: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically save the full training state at optimizer step ``step``; keep the newest ``keep_last``.

    ``meta`` goes into progress.json; ``extra_files`` (name -> JSON-able value) are written into the
    checkpoint before it becomes visible. Collective: every process must call it (sharded optimizer
    state and DeepSpeed gather inside). Returns the final ``step_*`` path.
    """
    root = checkpoints_dir(output_dir)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        clean_scratch(output_dir)
    accelerator.wait_for_everyone()

    try:
        _write_checkpoint(accelerator, root, tmp, final, step, keep_last, meta, extra_files, output_dir)
    except Exception as e:
        if not _disk_full(e):
            raise
        raise _disk_full_error(output_dir, tmp, step, e) from None
    accelerator.wait_for_everyone()
    return final


def _disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, also as torch.save's and safetensors' wrapped messages."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return any(
        m in text for m in ("No space left", "StorageFull", "Disk quota exceeded", "file write failed")
    )


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _disk_full_error(output_dir, tmp: Path, step: int, e: BaseException) -> CheckpointError:
    """Free the partial save, then say where, how much is free and how much a checkpoint needs."""
    root = checkpoints_dir(output_dir)
    written = _size(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    previous = list_checkpoints(output_dir)
    free = shutil.disk_usage(root).free if root.exists() else 0
    if previous:
        needed, basis = _size(previous[-1]), f"the size of {previous[-1].name}"
        kept = f"the previous checkpoint {previous[-1]} is intact"
    else:
        needed, basis = written, "at least what was written before the disk filled"
        kept = "no earlier checkpoint exists"
    return CheckpointError(
        f"no space left on the device of {root} while saving the checkpoint of step {step} ({e}): "
        f"{_human(free)} free, a checkpoint needs about {_human(needed)} ({basis}); the partial save "
        f"was removed and {kept}",
        hint="free space there or choose another train.output_dir (rotation needs room for keep_last + 1 "
        "checkpoints while saving), then resume with train.resume_from_checkpoint=latest",
    )


def _write_checkpoint(accelerator, root, tmp, final, step, keep_last, meta, extra_files, output_dir):
    faults.pause("save:start")
    accelerator.save_state(str(tmp))  # every process writes its part (RNG states, DeepSpeed shards)
    faults.pause("save:written")
    faults.disk_full("save:written")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, value in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(value) + "\n")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for f in files:
            _fsync(f)
        manifest = {str(f.relative_to(tmp)): f.stat().st_size for f in files}
        progress = {"step": step, "meta": dict(meta or {}), "files": manifest}
        with open(tmp / PROGRESS, "w") as f:  # last: its presence marks the folder complete
            f.write(json.dumps(progress, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        faults.pause("save:complete")
        if final.exists():  # saved again after resuming from an earlier checkpoint
            _remove(final)
        os.replace(tmp, final)
        _fsync(root)
        faults.pause("save:renamed")
        _write_atomic(root / LATEST, final.name + "\n")
        faults.pause("save:pointed")
        older = [p for p in list_checkpoints(output_dir) if p != final]
        for old in older[: max(0, len(older) - (keep_last - 1))]:
            _remove(old)


def load_checkpoint(accelerator, path: Path) -> int:
    """Restore the state saved at ``path``; returns the optimizer step it was taken at."""
    accelerator.load_state(str(path))
    return int(read_progress(path)["step"])


# ----------------------------------------------------------------------------------------------------
# the output folder


def check_output_dir(output_dir: str | Path, *, resume: str | None, overwrite: bool, is_main: bool) -> None:
    """Refuse to start a fresh run in a folder holding another run's checkpoints or model.

    Call on every process before anything is written. With ``overwrite`` the old checkpoints and model
    are deleted (by the main process); resuming (``resume`` set) keeps them; ``auto`` without a
    complete checkpoint is a fresh start. First, :func:`check_writable`.
    """
    out = Path(output_dir)
    root = checkpoints_dir(out)
    check_writable(out)
    if resume == "auto" and not list_checkpoints(out):
        resume = None
    if resume is not None:
        return
    held = []
    if root.is_dir() and any(_STEP_DIR.match(p.name) or p.name == LATEST for p in root.iterdir()):
        held.append(f"checkpoints ({', '.join(p.name for p in list_checkpoints(out)) or 'incomplete'})")
    if (out / "model").exists():
        held.append("saved model (model/)")
    if not held:
        return
    if not overwrite:
        raise CheckpointError(
            f"train.output_dir={str(out)!r} already holds another run's {' and '.join(held)}; "
            "refusing to overwrite it",
            hint="continue that run with train.resume_from_checkpoint=latest, choose another "
            "train.output_dir, or set train.overwrite=true to replace it",
        )
    if is_main:
        for p in (root, out / "model"):
            if p.exists():
                trash = p.with_name(f".trash-{p.name}")
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(p, trash)
                shutil.rmtree(trash, ignore_errors=True)


# where a missing first folder most likely means an unmounted drive, not a folder to create
MOUNT_ROOTS = ("/", "/mnt", "/media", "/run/media", "/Volumes", "/net")


def check_writable(output_dir: str | Path) -> None:
    """Fail at once, in one ``error:`` line, when ``output_dir`` cannot hold the run's outputs: a path
    that is a file (or under one), a folder this process cannot write, or a path whose drive is
    missing (its nearest existing ancestor is ``/`` or a mount root such as ``/mnt``: creating it
    would silently write to the system disk instead). Creates the folder otherwise."""
    out = Path(output_dir)
    shown = f"train.output_dir={str(out)!r}"
    if out.exists() and not out.is_dir():
        raise CheckpointError(
            f"{shown} is a file, not a folder", hint="choose another train.output_dir or move the file"
        )
    ancestor = out.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CheckpointError(
            f"{shown}: {ancestor} is a file, not a folder", hint="choose another train.output_dir"
        )
    if ancestor != out.absolute() and str(ancestor) in MOUNT_ROOTS:
        missing = out.absolute().relative_to(ancestor).parts[0]
        raise CheckpointError(
            f"{shown}: {ancestor / missing} does not exist (a drive that is not mounted?); refusing to "
            f"create it on the disk of {ancestor}",
            hint="mount the drive, or create the folder first if it is meant to be there",
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(
            f"{shown} cannot be written: {e.strerror or e} ({e.filename or out})",
            hint="choose a folder this user can write (check its permissions and free space)",
        ) from None
