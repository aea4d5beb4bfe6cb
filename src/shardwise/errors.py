"""Errors a user can act on, and the recipes' top-level handler that prints them in one line.

The bottom layer of the package: it imports nothing from shardwise, and every other module raises
these (``configfile``, ``data``, ``models``, ``train``; ``optim`` keeps torch's ValueError style).

Every error the project raises for a bad config, bad data, a refused output folder, a missing
checkpoint or a diverged run is a :class:`ShardwiseError`. Its message names the key / file / step,
its ``hint`` says what to do. ``exit_on_error`` turns one into::

    error: optimizer.lrr: unknown config key ...; did you mean 'lr'?
    hint: ...

on stderr and exit code 2 (no traceback). Any other exception is a bug and keeps its traceback.
A subclass may set ``exit_code`` / ``label`` (``shardwise.train.preempt.Stopped``: ``stopped:``,
exit 75) and ``once`` (printed by rank 0 only). Ctrl-C outside the training loop prints one line and
exits 130.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
from collections.abc import Iterable

EXIT_CODE = 2  # argparse's code for bad usage: the run cannot succeed as configured
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention: Ctrl-C outside the training loop
# set by ``python -m shardwise.launch``: each rank writes its error lines to RANK.err there instead of
# stderr, and the wrapper prints the first failing rank's once
ERROR_DIR_ENV = "SHARDWISE_ERROR_DIR"


class ShardwiseError(Exception):
    """Base of the errors a user fixes (config, data, output folder, checkpoint, divergence)."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class ConfigError(ShardwiseError, ValueError):
    """A config value or key is invalid; the message names the dotted key and how to fix it."""


class DataError(ShardwiseError, ValueError):
    """The data set cannot be used as configured (missing file or column, bad labels, empty split)."""


class DataNotFoundError(ShardwiseError, FileNotFoundError):
    """A data set is not at any place we look; the message says where to put it."""


class CheckpointError(ShardwiseError, FileNotFoundError):
    """No usable checkpoint where one was asked for, or an output folder that would be overwritten."""


class DivergenceError(ShardwiseError, RuntimeError):
    """Too many consecutive optimizer steps skipped for non-finite loss or gradients."""


def did_you_mean(name: str, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices`` (difflib), or "" when none is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=cutoff)
    return f"; did you mean {close[0]!r}?" if close else ""


@contextlib.contextmanager
def exit_on_error():
    """Run a recipe's ``main``; a :class:`ShardwiseError` prints ``error: ...`` (+ hint) and exits 2.

    With several processes every rank prints (a rank-specific error must not be lost); ranks other
    than 0 prefix their rank so the duplicate lines of a shared error are recognisable. Under
    ``python -m shardwise.launch`` (``SHARDWISE_ERROR_DIR`` set) the lines go to ``rankR.err`` in that
    folder instead, and the wrapper prints the first failing rank's once.
    """
    try:
        yield
    except ShardwiseError as e:
        rank = int(os.environ.get("RANK", "0"))
        code = getattr(e, "exit_code", EXIT_CODE)
        if rank and getattr(e, "once", False):  # every rank raised it at the same point: rank 0 speaks
            raise SystemExit(code) from None
        # a user error under the wrapper goes to its folder (printed once, exit 2); a stop (exit 75)
        # is not an error of the run's setup and prints as usual
        folder = os.environ.get(ERROR_DIR_ENV) if code == EXIT_CODE else None
        prefix = f"[rank {rank}] " if rank and not folder else ""
        lines = [f"{prefix}{getattr(e, 'label', 'error')}: {e}"]
        if getattr(e, "hint", None):
            lines.append(f"{prefix}hint: {e.hint}")
        sys.stdout.flush()
        if folder and os.path.isdir(folder):
            tmp = os.path.join(folder, f".rank{rank}.tmp")
            with open(tmp, "w") as f:
                f.write("\n".join(lines) + "\n")
            os.replace(tmp, os.path.join(folder, f"rank{rank}.err"))  # whole, or not there
        else:
            print("\n".join(lines), file=sys.stderr, flush=True)
        raise SystemExit(code) from None
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (inside it, a graceful stop)
        sys.stdout.flush()
        print("\ninterrupted (SIGINT): no checkpoint written by this stop", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
