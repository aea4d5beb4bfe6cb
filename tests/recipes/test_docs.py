"""The HF Trainer example in docs/recipes.md runs as written (shardwise AdamW + schedule via optimizers=)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from ..helpers import ROOT


def _example(marker: str) -> str:
    text = (ROOT / "docs" / "recipes.md").read_text()
    m = re.search(rf"<!-- test: {marker} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"docs/recipes.md has no python block after <!-- test: {marker} -->"
    return m.group(1)


@pytest.mark.slow
def test_trainer_example_runs(tmp_path):
    code = _example("trainer-example")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    loss = float(re.search(r"final train loss ([0-9.]+)", proc.stdout).group(1))
    assert 0 < loss < 5
