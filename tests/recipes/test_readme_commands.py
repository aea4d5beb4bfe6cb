"""The commands of README.md and docs/recipes.md work exactly as printed, after `make setup`.

Every fenced block right after a ``<!-- runnable -->`` marker is run line by line (``\\`` continuations
joined) in the repository root, with the virtual environment active as its first line says. Heavy
configs are swapped for the tiny ones and every recipe run gets a fresh output folder, no trackers and
no progress bars; what needs a cluster, Docker or a DeepSpeed build is skipped (other tests cover it).
Also: the demo's figures in README and docs are the ones its YAML header states.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from ..helpers import ROOT, ensure_assets, free_port

DOCS = [ROOT / "README.md", ROOT / "docs" / "recipes.md"]
TINY = {
    "configs/recipes/bert_minilm_r8.yaml": "configs/recipes/bert_tiny.yaml",
    "configs/recipes/gpt_smollm2_shakespeare.yaml": "configs/recipes/gpt_tiny.yaml",
    "configs/recipes/sft_smollm2_chitchat.yaml": "configs/recipes/sft_tiny.yaml",
}
QUICK = ["train.report_to=[]", "train.progress=false"]
CIFAR = ["compare=[adamw]", "model.width=0.0625", "train.epochs=1", "data.train_subset=256"]
CIFAR += ["data.test_subset=128"]
SKIP = ("make ", "sbatch ", "launch/docker.sh", "deepspeed_")


def runnable_blocks(path):
    text = path.read_text()
    return re.findall(r"<!-- runnable -->\s*```(?:bash|sh)?\n(.*?)```", text, re.S)


def commands(block: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [ln.split(" #", 1)[0].strip() for ln in joined.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def test_every_doc_has_a_runnable_block_that_activates_the_venv():
    for path in DOCS:
        blocks = runnable_blocks(path)
        assert blocks, f"{path.name}: no <!-- runnable --> block"
    readme = commands(runnable_blocks(DOCS[0])[0])
    assert readme[0] == "source .venv/bin/activate"  # `accelerate` / `python` are the venv's


def tiny(cmd: str, out) -> str:
    """The command with tiny configs, its own output folder and port, and quiet logging."""
    for big, small in TINY.items():
        cmd = cmd.replace(big, small)
    extra = [f"train.output_dir={out}", *QUICK]
    if "cifar_compare.py" in cmd:
        extra += CIFAR
    if cmd.startswith("accelerate launch "):
        cmd = cmd.replace("accelerate launch ", f"accelerate launch --main_process_port {free_port()} ", 1)
    return f"{cmd} {' '.join(shlex.quote(x) for x in extra)}"


CASES = [
    pytest.param(path, i, cmd, id=f"{path.name}:{cmd[:60]}")
    for path in DOCS
    for block in runnable_blocks(path)
    for i, cmd in enumerate(commands(block))
    if not cmd.startswith(("source ",)) and not any(s in cmd for s in SKIP)
]


@pytest.mark.slow
@pytest.mark.parametrize(("path", "index", "cmd"), CASES)
def test_command_runs_as_printed(path, index, cmd, tmp_path):
    ensure_assets("minilm", "reuters-r8", "smollm2", "chitchat")
    if "cifar" in cmd:
        from shardwise.data.images import load_fashion_mnist
        from shardwise.errors import ShardwiseError

        try:
            load_fashion_mnist()
        except ShardwiseError as e:
            pytest.skip(f"Fashion-MNIST not installed: {e}")
    venv_bin = os.path.dirname(sys.executable)  # what `source .venv/bin/activate` puts first on PATH
    env = {
        **os.environ,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "TOKENIZERS_PARALLELISM": "false",
        "MAIN_PROCESS_PORT": str(free_port()),
    }
    full = tiny(cmd, tmp_path / "out")
    proc = subprocess.run(
        ["bash", "-c", full], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"{full}\n{(proc.stdout + proc.stderr)[-4000:]}"


# ----------------------------------------------------------------------------------------------------
# the demo's figures: one source (the YAML header), repeated in README and docs


def demo_figures() -> dict[str, str]:
    header = (ROOT / "configs" / "recipes" / "bert_minilm_r8.yaml").read_text()
    m = re.search(
        r"eval accuracy ([0-9.]+), macro-F1 ([0-9.]+), eval loss ([0-9.]+).*?(\d+m\d+s) wall", header, re.S
    )
    assert m, "bert_minilm_r8.yaml's header lost its 'Measured' line"
    return dict(zip(("accuracy", "macro_f1", "loss", "wall"), m.groups(), strict=True))


def test_demo_figures_agree_between_yaml_readme_and_docs():
    f = demo_figures()
    readme = (ROOT / "README.md").read_text()
    docs = (ROOT / "docs" / "recipes.md").read_text()
    assert f"eval accuracy {f['accuracy']} in {f['wall']}" in readme
    for fragment in (
        f"eval accuracy **{f['accuracy']}**",
        f"macro-F1 {f['macro_f1']}",
        f"eval loss {f['loss']}",
    ):
        assert fragment in docs, fragment
    assert f"{f['wall']} wall" in docs
