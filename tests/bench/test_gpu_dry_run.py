"""bench/gpu.sh's dry run (``--device cpu``, tiny sizes) goes through every stage and writes every JSON.

The real run needs a CUDA machine; this keeps the script known to work without one: the same stages
(correctness check, optimizer step at two sizes, the bf16/SmolLM2-shaped end-to-end step on the CPU
in fp32, the report) in the same order, writing the same files. Nothing here asserts a timing.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # several minutes on 2 cores: Inductor compiles the fused path for two variants
def test_gpu_sh_dry_run_writes_every_json(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    (tmp_path / "out").mkdir()
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), "--device", "cpu", "--results", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    results = tmp_path / "r"
    run = json.loads((results / "gpu_run.json").read_text())
    assert [s["stage"] for s in run["stages"]] == ["check", "step", "step_1b", "e2e", "scaling", "report"]
    assert all(s["status"] == "ok" for s in run["stages"]), run

    check = json.loads((results / "gpu_check.json").read_text())
    assert check["passed"] and check["config"]["device"] == "cpu"
    assert {r["check"] for r in check["rows"]} == {"backend", "public"}
    assert all(r["graphs_compiled"] >= 1 for r in check["rows"] if r["check"] == "backend")

    for name in ("optim_step_cuda", "optim_step_cuda_1b"):
        doc = json.loads((results / f"{name}.json").read_text())
        rows = {r["name"]: r for r in doc["rows"]}
        assert doc["config"]["device"] == "cpu"
        for shardwise in ("foreach", "fused"):
            for bits in (32, 8):
                assert rows[f"shardwise_{shardwise}_adam_{bits}bit"]["status"] == "ok"
        # bitsandbytes: measured, or the reason it is not
        assert rows["bnb_adamw8bit"]["status"] == "ok" or rows["bnb_adamw8bit"]["status"].startswith(
            "unavailable: "
        )

    e2e = json.loads((results / "e2e_cuda.json").read_text())
    assert set(e2e["cases"]) == {"smollm2"}
    assert {r["name"] for r in e2e["rows"]} == {
        "loop_torch_fused",
        "loop_shardwise_foreach_32bit",
        "loop_shardwise_foreach_8bit",
        "loop_shardwise_fused_32bit",
        "loop_shardwise_fused_8bit",
    }
    assert all(r["status"] == "ok" and r["ratio"] > 0 for r in e2e["rows"])

    report = (results / "BENCHMARKS.md").read_text()
    for heading in ("Optimizer step (CUDA)", "End-to-end throughput (CUDA)", "GPU correctness check"):
        assert f"## {heading}" in report
    back = {p.name for p in (tmp_path / "out").iterdir()}
    assert len(back) <= 8  # what the device tool brings back
    assert {"gpu_check.json", "gpu_run.json", "optim_step_cuda.json", "e2e_cuda.json"} <= back
