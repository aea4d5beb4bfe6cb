"""The fused kernel's build cache: keyed by what the binary depends on, never by the checkout path
(issue 14: every clone or worktree rebuilt it, 34-76 s each)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shardwise
from shardwise.optim.kernels import fused

_PROBE = """
import sys
from shardwise.optim.kernels import fused
module = fused._native()
print(fused.build_name(), module is not None, fused.why_unavailable(__import__("torch").device("cpu")))
"""


def _probe(package_parent: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=600, check=True
    )


def test_build_name_depends_on_source_not_path():
    source = fused._SOURCE.read_text()
    assert fused.build_name(source) == fused.build_name()
    assert fused.build_name(source + "\n// changed\n") != fused.build_name()


@pytest.mark.skipif(os.environ.get("SHARDWISE_DISABLE_NATIVE") == "1", reason="native kernel disabled")
def test_two_checkouts_share_one_build(tmp_path):
    """Two copies of the package in different folders: same build name, and the second copy loads
    the build the first made (no "building" line, no compile)."""
    assert fused.available(torch.device("cpu")), fused.why_unavailable(torch.device("cpu"))
    package = Path(shardwise.__file__).parent
    runs = []
    for folder in ("one", "two/deeper"):
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(package, tmp_path / folder / "shardwise", ignore=ignore)
        runs.append(_probe(tmp_path / folder))
    for run in runs:
        name, loaded, _why = run.stdout.split(maxsplit=2)
        assert name == fused.build_name() and loaded == "True", (run.stdout, run.stderr)
        assert "building" not in run.stderr, run.stderr
