"""``accelerate launch`` with one error line: ``python -m shardwise.launch [accelerate launch args]``.

Under ``accelerate launch`` (torchrun's elastic agent) a recipe's clean error is printed by every
rank that meets it, and the agent then reports the child's non-zero exit as its own
``ChildFailedError`` traceback and exits 1. This wrapper runs ``accelerate launch`` with the same
arguments and:

- tells the recipes (``SHARDWISE_ERROR_DIR``) to write their ``error:`` / ``hint:`` lines to a file
  per rank instead of stderr (``shardwise.errors.exit_on_error``);
- passes the run's output through unchanged until the first such file appears, then holds back the
  rest of stderr (the agent's traceback, the other ranks being stopped);
- prints the first failing rank's lines once and exits 2, as a one-process run does.

A failure that is not a ``ShardwiseError`` (a bug) writes no file: everything is shown and the
launcher's own exit code is returned.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from shardwise.errors import ERROR_DIR_ENV, EXIT_CODE


def accelerate_command() -> list[str]:
    """The ``accelerate`` next to this interpreter (a venv), else the one on PATH."""
    local = Path(sys.executable).with_name("accelerate")
    found = str(local) if local.exists() else shutil.which("accelerate")
    return [found] if found else [sys.executable, "-m", "accelerate.commands.accelerate_cli"]


def first_error(folder: Path) -> str | None:
    """The error lines of the rank that failed first (by the time its file was written)."""
    files = sorted(folder.glob("rank*.err"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    return files[0].read_text() if files else None


def run(args: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="shardwise-errors-") as tmp:
        folder = Path(tmp)
        env = {**os.environ, ERROR_DIR_ENV: tmp}
        proc = subprocess.Popen([*accelerate_command(), "launch", *args], env=env, stderr=subprocess.PIPE)
        held_back = False
        try:
            while chunk := os.read(proc.stderr.fileno(), 65536):  # progress bars stay live
                held_back = held_back or any(folder.glob("rank*.err"))
                if not held_back:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.flush()
        except KeyboardInterrupt:  # the terminal's Ctrl-C reached the launcher too; let it stop the ranks
            pass
        code = proc.wait()
        error = first_error(folder)
    if error is None:
        return code
    sys.stdout.flush()
    print(error.rstrip("\n"), file=sys.stderr, flush=True)
    return EXIT_CODE


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        raise SystemExit(0 if args else EXIT_CODE)
    raise SystemExit(run(args))


if __name__ == "__main__":
    main()
