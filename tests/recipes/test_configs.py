"""Every YAML/JSON under configs/ parses and validates; each recipe YAML starts with its exact command."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from shardwise.configfile import ConfigError, load_config

from ..helpers import ROOT

CONFIGS = ROOT / "configs"
ALL_YAML = sorted(CONFIGS.rglob("*.yaml")) + sorted(CONFIGS.rglob("*.yml"))


def _recipe_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _header_command(path: Path) -> list[str]:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path}: the first line must be the command that runs it"
    return shlex.split(first[2:].split("  (")[0].split("   ")[0])


def test_found_configs():
    names = {p.relative_to(CONFIGS).as_posix() for p in ALL_YAML}
    for required in (
        "recipes/bert_tiny.yaml",
        "recipes/gpt_tiny.yaml",
        "recipes/bert_minilm_r8.yaml",
        "accelerate/cpu_ddp.yaml",
        "accelerate/single_gpu.yaml",
        "accelerate/multi_gpu.yaml",
        "accelerate/fsdp2.yaml",
        "accelerate/deepspeed_zero1.yaml",
        "accelerate/deepspeed_zero2.yaml",
        "accelerate/deepspeed_zero3.yaml",
        "accelerate/multi_node.yaml",
    ):
        assert required in names


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_yaml_parses_and_validates(path):
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and data, f"{path} is empty"
    kind = path.relative_to(CONFIGS).parts[0]
    if kind == "accelerate":
        from accelerate.commands.config.config_args import load_config_from_file

        cfg = load_config_from_file(str(path))  # raises on unknown keys
        ds = (cfg.deepspeed_config or {}).get("deepspeed_config_file")
        if ds:
            assert (ROOT / ds).is_file(), f"{path} names a missing DeepSpeed JSON {ds}"
        assert "accelerate launch --config_file " + path.relative_to(ROOT).as_posix() in path.read_text()
        return
    # a recipe config: its header command names the recipe script and this file
    cmd = _header_command(path)
    scripts = [a for a in cmd if re.match(r"recipes/\w+\.py$", a)]
    assert scripts, f"{path}: header command {cmd} names no recipe"
    assert cmd[cmd.index("--config") + 1] == path.relative_to(ROOT).as_posix()
    recipe = _recipe_module(ROOT / scripts[0])
    try:
        load_config(recipe.Config, path)
    except ConfigError as e:
        pytest.fail(str(e))


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.json")), ids=lambda p: p.name)
def test_deepspeed_json(path):
    data = json.loads(path.read_text())
    assert "optimizer" not in data and "scheduler" not in data, "the recipe owns optimizer + schedule"
    assert data["zero_allow_untested_optimizer"] is True
    assert data["train_micro_batch_size_per_gpu"] == "auto" and data["gradient_accumulation_steps"] == "auto"
    assert data["zero_optimization"]["stage"] in (1, 2, 3)
    if data["zero_optimization"].get("offload_optimizer", {}).get("device", "none") != "none":
        # else accelerate swaps the shardwise optimizer for DeepSpeedCPUAdam (docs/sharding.md)
        assert data["zero_force_ds_cpu_optimizer"] is False


@pytest.mark.slow
def test_cpu_ddp_starts_two_processes(tmp_path):
    """The cpu_ddp config really starts 2 workers (``--cpu --num_processes 2`` would start one)."""
    import subprocess

    from ..helpers import recipe_cmd

    script = tmp_path / "ranks.py"
    # One write per rank: print() of several arguments may be several writes when stdout is
    # unbuffered, and the two ranks share the pipe ("RANKRANK 0 2 ..." was seen in CI).
    script.write_text(
        "import os\nfrom accelerate import Accelerator\na = Accelerator(cpu=True)\n"
        "line = f'RANK {a.process_index} {a.num_processes} {a.distributed_type.value}\\n'\n"
        "os.write(1, line.encode())\n"
    )
    cmd = recipe_cmd("x.py", "x.yaml", accelerate_config="cpu_ddp.yaml")
    cmd = [*cmd[: cmd.index("--main_process_port") + 2], str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    out = proc.stdout
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert sorted(line for line in out.splitlines() if line.startswith("RANK")) == [
        "RANK 0 2 MULTI_CPU",
        "RANK 1 2 MULTI_CPU",
    ]


# How each shipped accelerate config is exercised on a CPU-only machine: the recipe tests that run it
# (2 processes on gloo), or why it cannot run here (checked from the parsed file).
RUN_ON_CPU = {
    "cpu_ddp.yaml": "test_sft_chat.py::test_tiny_two_processes_sharded_8bit (+ finetune_bert/gpt)",
    "single_gpu.yaml": "test_sft_chat.py::test_tiny_under_accelerate_configs (no GPU: runs on the CPU)",
    "multi_gpu.yaml": "test_sft_chat.py::test_tiny_under_accelerate_configs (--num_processes 2, gloo)",
    "deepspeed_zero1.yaml": "test_sft_chat.py::test_tiny_under_accelerate_configs",
    "deepspeed_zero2.yaml": "test_sft_chat.py::test_tiny_under_accelerate_configs (+ finetune_bert)",
    "deepspeed_zero3.yaml": "test_sft_chat.py::test_tiny_under_accelerate_configs (+ finetune_bert)",
    "deepspeed_zero2_offload.yaml": "test_finetune_bert.py::test_tiny_deepspeed (8-bit state, offloaded)",
}
CANNOT_RUN_ON_CPU = {
    # accelerate ignores its FSDP plugin without CUDA and would silently run DDP; the recipes refuse
    # (test_sft_chat.py / test_finetune_bert.py::test_fsdp_on_cpu_fails_loudly)
    "fsdp2.yaml": lambda cfg: cfg.distributed_type.value == "FSDP",
    # two machines: the static rendezvous waits for machine_rank 1 at main_process_ip
    "multi_node.yaml": lambda cfg: cfg.num_machines > 1 and cfg.rdzv_backend == "static",
}


def test_every_accelerate_config_is_exercised():
    """A new accelerate config must be run by a recipe test on CPU, or say why it cannot be."""
    from accelerate.commands.config.config_args import load_config_from_file

    shipped = {p.name for p in (CONFIGS / "accelerate").glob("*.yaml")}
    assert shipped == set(RUN_ON_CPU) | set(CANNOT_RUN_ON_CPU), "classify the new config above"
    assert not set(RUN_ON_CPU) & set(CANNOT_RUN_ON_CPU)
    from .test_finetune_bert import DEEPSPEED_CONFIGS  # what finetune_bert's test_tiny_deepspeed runs
    from .test_sft_chat import ACCELERATE_CONFIGS  # what test_tiny_under_accelerate_configs runs

    ran = {c for c, *_ in ACCELERATE_CONFIGS} | {c for c, _ in DEEPSPEED_CONFIGS} | {"cpu_ddp.yaml"}
    assert set(RUN_ON_CPU) == ran
    for name, reason in CANNOT_RUN_ON_CPU.items():
        assert reason(load_config_from_file(str(CONFIGS / "accelerate" / name))), name
