"""Fault injection for the reliability tests, through one environment variable (off when unset).

``SHARDWISE_TEST_FAULTS`` is a comma-separated list of ``name=value``:

- ``nan_loss_from=S`` (with ``nan_rank=R``, default every rank): from optimizer step S on, every
  micro-batch loss is made NaN (as a real overflow would be) — the divergence guard's path;
- ``raise_at=S`` (with ``raise_rank=R``, default every rank): raise at optimizer step S — a rank dying;
- ``slow_save=SECONDS``: sleep at each stage of a checkpoint save, so that a ``kill -9`` lands inside it;
- ``disk_full_at_save=N``: the N-th checkpoint save of the process fails with ENOSPC after the
  training state was written (a disk filling up mid-save).

``SHARDWISE_TEST_SAMPLES=DIR`` records the samples each process trains on (one JSON line per
micro-batch in ``DIR/rank<R>.jsonl``: a hash of each row's tokens), for the resume accounting tests.

The hooks sit where a real fault would strike (the loss, the step, the save), so a test exercises
the code path a real run takes. Nothing here is read unless the variable is set.
"""

from __future__ import annotations

import functools
import os
import sys
import time

ENV = "SHARDWISE_TEST_FAULTS"
SAMPLES_ENV = "SHARDWISE_TEST_SAMPLES"
_saves = [0]


@functools.cache
def _spec() -> dict[str, float]:
    raw = os.environ.get(ENV, "")
    out = {}
    for item in filter(None, (s.strip() for s in raw.split(","))):
        name, _, value = item.partition("=")
        out[name.strip()] = float(value)
    return out


def get(name: str) -> float | None:
    return _spec().get(name)


def pause(stage: str) -> None:
    """Sleep ``slow_save`` seconds at a checkpoint-save stage, when set; the stage goes to stderr first,
    so that the output of a killed run shows where in the save the kill landed."""
    delay = get("slow_save")
    if delay:
        print(f"{ENV}: checkpoint save, {stage}", file=sys.stderr, flush=True)
        time.sleep(delay)


def nan_loss(step: int, rank: int = 0) -> bool:
    """True when this rank's loss of (1-based) optimizer step ``step`` is to be poisoned."""
    start, who = get("nan_loss_from"), get("nan_rank")
    return start is not None and step >= start and (who is None or rank == who)


def maybe_raise(step: int, rank: int) -> None:
    at, who = get("raise_at"), get("raise_rank")
    if at is not None and step == at and (who is None or rank == who):
        raise RuntimeError(f"{ENV}: injected failure on rank {rank} at step {step}")


def disk_full(stage: str) -> None:
    """Raise ENOSPC at the ``save:written`` stage of the ``disk_full_at_save``-th save."""
    at = get("disk_full_at_save")
    if at is None or stage != "save:written":
        return
    _saves[0] += 1
    if _saves[0] == at:
        import errno

        raise OSError(errno.ENOSPC, f"No space left on device ({ENV}: disk_full_at_save={at:g})")


def record_batch(batch, step: int, rank: int) -> None:
    """Append a hash of each row of ``batch`` (its non-padding tokens) to ``$SHARDWISE_TEST_SAMPLES``."""
    folder = os.environ.get(SAMPLES_ENV)
    if not folder:
        return
    import hashlib
    import json

    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    rows = []
    for i in range(ids.shape[0]):
        row = ids[i][mask[i].bool()] if mask is not None else ids[i]
        rows.append(hashlib.sha1(row.cpu().numpy().tobytes()).hexdigest()[:16])
    with open(os.path.join(folder, f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "pid": os.getpid(), "rows": rows}) + "\n")
