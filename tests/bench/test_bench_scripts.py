"""The bench scripts run (tiny ``--quick`` sizes), write the JSON the report reads, and the report renders.

Nothing here asserts a timing: on a shared CI machine those are noise. What is checked is the
schema (every candidate has a status; measured ones have their numbers), that a missing anchor is
recorded as ``unavailable: ...`` rather than dropped, and that report.py turns the JSON into
BENCHMARKS.md with tables, plots and the headline block.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


def _run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _common():
    spec = importlib.util.spec_from_file_location("bench_common", BENCH / "common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check_machine(doc: dict) -> None:
    for key in ("date", "git_sha", "cpu_model", "logical_cpus", "torch", "torch_threads"):
        assert key in doc["machine"], key


def _check_rows(rows: list[dict], numbers: tuple[str, ...]) -> None:
    assert rows
    for r in rows:
        assert r["status"] == "ok" or r["status"].startswith("unavailable: "), r
        if r["status"] == "ok":
            for key in numbers:
                assert isinstance(r[key], (int, float)), (r["name"], key)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """All scripts at --quick size into one results folder (shared by the report tests)."""
    out = tmp_path_factory.mktemp("results")
    _run("optim_step.py", "--quick", "--only", "torch,shardwise", "--out", str(out / "optim_step.json"))
    _run("scaling.py", "--quick", "--out", str(out / "scaling.json"))
    only = "no_optimizer,torch_adamw,shardwise_8bit"
    _run("memory.py", "--quick", "--only", only, "--out", str(out / "memory.json"))
    _run(
        "e2e.py",
        "--quick",
        "--only",
        "loop_shardwise_8bit,trainer_torch_fused",
        "--out",
        str(out / "e2e.json"),
    )
    return out


@pytest.mark.slow
def test_optim_step_schema(results):
    doc = json.loads((results / "optim_step.json").read_text())
    _check_machine(doc)
    assert doc["baseline"] == "torch_fused" and doc["config"]["quick"]
    rows = {r["name"]: r for r in doc["rows"]}
    _check_rows(doc["rows"], ("median_ms", "min_ms", "max_ms", "ratio", "state_bytes_per_param"))
    assert {"torch_forloop", "torch_foreach", "torch_fused"} <= set(rows)
    # every shardwise impl x variant x state_bits (reference: plain adam only, by default)
    sw = [r for r in doc["rows"] if r["library"] == "shardwise"]
    assert len(sw) == 2 * 5 * 2 + 2
    assert rows["torch_fused"]["ratio"] == 1.0
    assert rows["shardwise_fused_adam_8bit"]["state_bytes_per_param"] < 2.1


@pytest.mark.slow
def test_optim_step_records_missing_anchors(tmp_path):
    """bitsandbytes installed or not, each of its rows is either measured or says why not."""
    out = tmp_path / "anchors.json"
    _run("optim_step.py", "--quick", "--reference", "none", "--only", "bitsandbytes", "--out", str(out))
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert {"bnb_adamw8bit", "bnb_adamw32bit", "torch_fused"} <= set(rows)
    _check_rows(list(rows.values()), ("median_ms", "state_bytes_per_param"))


@pytest.mark.slow
def test_scaling_schema(results):
    doc = json.loads((results / "scaling.json").read_text())
    _check_machine(doc)
    assert doc["copy_bandwidth_bytes_per_s"] > 0
    _check_rows(doc["rows"], ("median_ms", "bound_ms", "state_bytes", "fraction_of_bound"))
    assert len({r["params"] for r in doc["rows"]}) >= 2


@pytest.mark.slow
def test_memory_schema(results):
    doc = json.loads((results / "memory.json").read_text())
    _check_machine(doc)
    _check_rows(doc["rows"], ("peak_rss_bytes", "state_bytes", "peak_over_floor_bytes"))
    rows = {r["name"]: r for r in doc["rows"]}
    assert rows["shardwise_8bit"]["state_bytes"] < rows["torch_adamw"]["state_bytes"]


@pytest.mark.slow
def test_e2e_schema(results):
    """Every case (MiniLM, SmolLM2-shaped, 2-process DDP) has its own baseline, ratios and spread."""
    doc = json.loads((results / "e2e.json").read_text())
    _check_machine(doc)
    _check_rows(
        doc["rows"], ("samples_per_s", "samples_per_s_min", "samples_per_s_max", "ratio", "ratio_min")
    )
    assert set(doc["cases"]) == {"minilm", "smollm2", "ddp"} and doc["cases"]["ddp"]["world"] == 2
    names = {case: {r["name"] for r in doc["rows"] if r["case"] == case} for case in doc["cases"]}
    assert names["minilm"] == {"loop_shardwise_8bit", "trainer_torch_fused", "loop_torch_fused"}
    assert names["smollm2"] == names["ddp"] == {"loop_shardwise_8bit", "loop_torch_fused"}
    for r in doc["rows"]:
        assert r["status"] == "ok", r  # no anchor is optional here: all are torch or shardwise
        if r["name"] == "loop_torch_fused":
            assert r["ratio"] == 1.0
    assert len(doc["headline"]) == 3


@pytest.mark.slow
def test_report_renders(results, tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    _run("report.py", "--results", str(results), "--out", str(out))
    text = out.read_text()
    assert text.count("<!-- bench:headline -->") == 1 and text.count("<!-- /bench:headline -->") == 1
    for heading in (
        "## Optimizer step (CPU)",
        "## Scaling",
        "## Training memory",
        "## End-to-end throughput",
    ):
        assert heading in text
    assert "--quick" in text  # smoke-size results are flagged
    assert "Not run" in text  # no CUDA results here
    for png in ("optim_step.png", "scaling.png", "memory.png", "e2e.png"):
        assert (results / png).stat().st_size > 0
        assert png in text


def test_report_without_results(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    _run("report.py", "--results", str(tmp_path), "--out", str(out))
    text = out.read_text()
    assert "No results yet" in text and text.count("Not run") >= 5


def test_interleaved_rotates_and_records_failures():
    common = _common()
    calls = []

    def make(name):
        return lambda: calls.append(name)

    def broken():
        raise RuntimeError("no kernel for this device\nsecond line")

    times = common.interleaved(
        {"a": make("a"), "b": make("b"), "c": make("c"), "x": broken}, reps=3, warmup=1
    )
    assert calls[:3] == ["a", "b", "c"] and calls[3:6] == ["b", "c", "a"]  # rotating order
    assert all(len(times[n]) == 3 for n in "abc")
    assert times["x!"] == "unavailable: RuntimeError: no kernel for this device"


def test_state_bytes_counts_shared_storage_once():
    import torch

    common = _common()
    shared = torch.zeros(256)

    opt = types.SimpleNamespace(
        state={0: {"step": torch.tensor(3.0), "m": torch.zeros(10), "qmap": shared}, 1: {"qmap": shared}}
    )
    assert common.state_bytes(opt) == 10 * 4 + 256 * 4


def test_state_bytes_measures_the_wrapped_optimizer():
    import torch

    common = _common()
    p = torch.nn.Parameter(torch.zeros(6))
    p.grad = torch.ones(6)
    inner = torch.optim.AdamW([p])
    inner.step()  # exp_avg + exp_avg_sq: 2 x 6 fp32
    # torch's ZeroRedundancyOptimizer keeps its rank's optimizer in .optim
    assert common.state_bytes(types.SimpleNamespace(optim=inner)) == 2 * 6 * 4


def test_report_headline_is_what_each_json_declares(tmp_path):
    """report.py knows no row names: each script writes its own headline lines into its JSON."""
    doc = {
        "machine": {"cpu_model": "test CPU", "logical_cpus": 2, "torch": "x", "date": "d", "git_sha": "s"},
        "headline": ["- a line the script wrote"],
        "rows": [],
    }
    (tmp_path / "zero.json").write_text(json.dumps({**doc, "params": 1, "rows": []}))
    out = tmp_path / "BENCHMARKS.md"
    _run("report.py", "--results", str(tmp_path), "--out", str(out))
    text = out.read_text()
    block = text[text.index("<!-- bench:headline -->") : text.index("<!-- /bench:headline -->")]
    assert "- a line the script wrote" in block and "Measured on test CPU, 2 logical CPUs" in block


def test_free_port_is_bindable():
    import socket

    port = _common().free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
