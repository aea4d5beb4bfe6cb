"""Graceful stop on a signal: finish the optimizer step, agree on it, checkpoint, exit 75.

Clusters and spot machines announce preemption with a signal some seconds before SIGKILL (SLURM:
SIGTERM, or the one chosen with ``--signal``; Kubernetes: SIGTERM). :class:`StopOnSignal` turns the
signals of ``train.stop_signals`` into a request that :func:`shardwise.train.loop.run_training`
honours between optimizer steps:

1. the handler only sets a flag (and prints one line): the step under way finishes normally;
2. after every optimizer step the flag is all-reduced (MAX) over the processes, so a signal reaching
   one rank stops all of them at the same step (one tiny collective per step: a 1-element CPU tensor,
   over a gloo group when the training backend is NCCL so that no CUDA stream is synchronized);
3. the run writes a checkpoint at that step through the normal crash-safe save
   (:func:`shardwise.train.checkpoint.save_checkpoint`), prints where it is and how to resume, and
   every process exits with :data:`EXIT_STOPPED` (75, ``EX_TEMPFAIL`` of sysexits.h: "try again").

Further signals while stopping (the launcher forwarding the same SIGTERM, an impatient Ctrl-C) are
acknowledged and ignored: the save goes on. Only SIGKILL interrupts it, and the atomic save then
leaves the previous checkpoint as ``latest``.

Under ``accelerate launch`` (torchrun's elastic agent) a SIGTERM/SIGINT to the launcher is forwarded
to every worker, which then has ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds (default 30) before the
agent sends SIGKILL: keep it above the checkpoint save time. The agent reports the workers' exit as its
own failure (exit 1, or 128 + the signal when it was signalled itself), so the distinct code 75 is
only seen directly with one plain process; scripts set ``SHARDWISE_STOP_FILE`` instead: the main
process writes a small JSON record there when a run stopped on a signal (``launch/slurm.sbatch``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from shardwise.errors import ShardwiseError

EXIT_STOPPED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, the user is invited to retry
STOP_FILE_ENV = "SHARDWISE_STOP_FILE"
DEFAULT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class Stopped(ShardwiseError):
    """The run stopped on a signal after saving a checkpoint; exit code 75, printed once (rank 0)."""

    exit_code = EXIT_STOPPED
    label = "stopped"
    once = True  # every rank raises it at the same step: rank 0 speaks for all


def signal_number(name: str) -> signal.Signals:
    """``"SIGTERM"`` / ``"TERM"`` -> signal.SIGTERM; ValueError for unknown or uncatchable ones."""
    key = name.strip().upper()
    key = key if key.startswith("SIG") else f"SIG{key}"
    try:
        sig = signal.Signals[key]
    except KeyError:
        raise ValueError(f"unknown signal {name!r} (expected names like SIGTERM, SIGINT, SIGUSR1)") from None
    if sig in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"{key} cannot be caught")
    return sig


class StopOnSignal:
    """Install handlers for ``names`` (a context manager); ``agreed()`` is the collective check.

    ``agreed()`` must be called by every process at the same point (after each optimizer step): it
    returns True on all of them as soon as any one got a signal.
    """

    def __init__(self, names, accelerator=None):
        self.signals = [signal_number(n) for n in names]
        self.received: list[signal.Signals] = []
        self.first_at: float | None = None
        self.saving = False
        self._previous: dict[signal.Signals, object] = {}
        self._group = None
        self._world = 1
        self._agreed: signal.Signals | None = None  # the signal the processes agreed on
        if accelerator is not None and accelerator.num_processes > 1 and torch.distributed.is_initialized():
            self._world = accelerator.num_processes
            if torch.distributed.get_backend() != "gloo":  # a CPU flag: no CUDA stream sync per step
                self._group = torch.distributed.new_group(backend="gloo")

    def __enter__(self) -> StopOnSignal:
        import threading

        if threading.current_thread() is threading.main_thread():  # Python only allows it there
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        sig = signal.Signals(signum)
        self.received.append(sig)
        rank = int(os.environ.get("RANK", "0"))
        prefix = f"[rank {rank}] " if rank else ""
        if len(self.received) == 1:
            self.first_at = time.monotonic()
            msg = f"{sig.name}: stopping after the current optimizer step, then saving a checkpoint"
        elif self.saving:
            msg = f"{sig.name} again: finishing the checkpoint being written (the previous one stays intact)"
        else:
            msg = f"{sig.name} again: already stopping after the current optimizer step"
        # os.write: safe inside a signal handler (print may be interrupted mid-buffer)
        os.write(sys.stderr.fileno(), f"\n{prefix}{msg}\n".encode())

    @property
    def requested(self) -> bool:
        """This process got a signal (not yet agreed with the others)."""
        return bool(self.received)

    def agreed(self, device=None) -> bool:
        """True on every process when any process got a signal (a MAX all-reduce when distributed:
        of the signal's number, so that every process can name it)."""
        if self._world == 1:
            self._agreed = self.received[0] if self.received else None
            return self._agreed is not None
        flag = torch.tensor([int(self.received[0]) if self.received else 0], dtype=torch.int32)
        if self._group is None and device is not None:
            flag = flag.to(device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        number = int(flag.item())
        self._agreed = signal.Signals(number) if number else None
        return self._agreed is not None

    def signal_name(self) -> str:
        """The signal the run stops on (received by this process or another one)."""
        sig = self._agreed or (self.received[0] if self.received else None)
        return sig.name if sig is not None else "?"


def write_stop_record(record: dict) -> Path | None:
    """Write ``record`` as JSON to ``$SHARDWISE_STOP_FILE`` (when set): how launch scripts learn that
    a run stopped at a checkpoint and wants to continue (a launcher hides the exit code)."""
    target = os.environ.get(STOP_FILE_ENV)
    if not target:
        return None
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def stopped_error(
    *,
    signal_name: str,
    step: int,
    total: int,
    checkpoint: Path,
    seconds: float,
    save_seconds: float | None = None,
) -> Stopped:
    """The message a stopped run ends with: where it stopped, the checkpoint, and how to resume."""
    return Stopped(
        f"{signal_name}: stopped at optimizer step {step}/{total}; checkpoint {checkpoint} written "
        f"{seconds:.1f}s after the signal"
        + (f" (the save took {save_seconds:.1f}s)" if save_seconds is not None else ""),
        hint="resume with the same command plus train.resume_from_checkpoint=auto (or =latest), on any "
        f"number of processes (exit code {EXIT_STOPPED} = stopped on a signal, resumable)",
    )
