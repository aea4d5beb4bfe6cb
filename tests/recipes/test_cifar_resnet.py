"""recipes/cifar_resnet.py and the sweep recipes/cifar_compare.py: config, optimizer registry, a smoke
run, the CPU regression, the GPU check.

The regression (`slow`) runs configs/recipes/cifar_resnet18_fmnist_cpu.yaml as it is: ResNet-18 at
width 1/8 on 4,000 Fashion-MNIST training images for 3 epochs, every optimizer of the comparison from
the same initialization. Floors and ceilings come from seeds 0-2 with margins (see
docs/cifar.md for the measured numbers and the choice of margins).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shardwise.configfile import ConfigError, load_config
from shardwise.data.images import CIFAR10_ENV, DEBIAN_FASHION_MNIST_DIR, load_cifar10

ROOT = Path(__file__).resolve().parents[2]
CPU_CONFIG = ROOT / "configs/recipes/cifar_resnet18_fmnist_cpu.yaml"
GPU_CONFIG = ROOT / "configs/recipes/cifar_resnet18_gpu.yaml"


# the recipes folder on the path, as for `python recipes/cifar_compare.py`: the sweep imports the recipe
sys.path.insert(0, str(ROOT / "recipes"))
import cifar_compare as compare  # noqa: E402
import cifar_resnet as recipe  # noqa: E402


def config(path=None, *overrides):
    return load_config(compare.Config, path, list(overrides))


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("path", [CPU_CONFIG, GPU_CONFIG])
def test_configs_load_and_start_with_their_command(path):
    first = path.read_text().splitlines()[0]
    assert first == f"# python recipes/cifar_compare.py --config configs/recipes/{path.name}"
    cfg = config(path)
    assert all(c.name in recipe.OPTIMIZERS for c in cfg.runs())


def test_gpu_config_is_the_seeds_setup():
    cfg = config(GPU_CONFIG)
    assert cfg.data.dataset == "cifar10" and cfg.model.width == 1.0 and cfg.data.augment
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.schedule.name) == (128, 100, "constant")
    assert cfg.train.max_grad_norm is None and cfg.train.mixed_precision == "no"
    specs = {c.name: c.resolve() for c in cfg.runs()}
    assert list(specs) == ["sgd", "sgd_momentum", "adam", "adamw"]
    assert (specs["sgd"].lr, specs["sgd"].momentum) == (0.1, 0.0)
    assert (specs["sgd_momentum"].lr, specs["sgd_momentum"].momentum) == (0.1, 0.9)
    assert (specs["adam"].kind, specs["adam"].lr, specs["adam"].weight_decay) == ("adam", 1e-3, 0.0)
    assert (specs["adamw"].kind, specs["adamw"].lr, specs["adamw"].weight_decay) == ("adamw", 1e-3, 0.01)


def test_compare_entries_are_names_or_mappings():
    cfg = config(None, "compare=[sgd, {name: adamw, lr: 3e-3, state_bits: 8}]")
    runs = cfg.runs()
    assert [r.label for r in runs] == ["sgd", "adamw (lr=0.003, state_bits=8)"]
    assert runs[1].resolve().lr == 3e-3 and runs[1].resolve().state_bits == 8
    assert compare.run_dir_name(runs[1]) == "adamw_lr0.003_state_bits8"
    assert config(None).runs() == [recipe.OptimizerChoice()]  # no compare: the `optimizer` section


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["compare=[sgd, adamm]"], "unknown optimizer 'adamm'; did you mean 'adam'"),
        (["optimizer.name=sgd_momentun"], "did you mean 'sgd_momentum'"),
        (["optimizer.name=sgd", "optimizer.state_bits=8"], "Adam family only"),
        (["optimizer.name=adam", "optimizer.momentum=0.9"], "momentum is an SGD option"),
        (["compare=[adam, adam]"], "the same optimizer twice"),
        (["optimizer.lrr=0.1"], "did you mean 'lr'"),
        (["data.dataset=mnist"], "data.dataset"),
    ],
)
def test_config_errors_name_the_problem(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config(None, *overrides)


def test_registry_builds_the_right_optimizers():
    from shardwise.optim import Adam, AdamW

    model = torch.nn.Linear(4, 2)
    made = {n: recipe.make_optimizer(s, model.parameters()) for n, s in recipe.OPTIMIZERS.items()}
    assert type(made["sgd"]) is torch.optim.SGD and made["sgd"].defaults["momentum"] == 0
    assert made["sgd_momentum"].defaults["momentum"] == 0.9
    assert type(made["adam"]) is Adam and made["adam"].defaults["weight_decay"] == 0
    for name in ("adamw", "amsgrad", "radam", "adabelief"):
        assert type(made[name]) is AdamW and made[name].defaults["weight_decay"] == 0.01
    assert made["amsgrad"].defaults["amsgrad"] and made["radam"].defaults["variant"] == "radam"
    assert made["adabelief"].defaults["variant"] == "adabelief"
    assert {n for n in made if n.endswith("_8bit")} == {f"{n}_8bit" for n in recipe._BASE if "sgd" not in n}
    assert all(made[n].state_bits == 8 for n in made if n.endswith("_8bit"))


# ---------------------------------------------------------------------------------------------- smoke


def write_cifar_folder(folder: Path, per_batch: int = 16, seed: int = 0) -> None:
    """A tiny CIFAR-10 python-pickle folder (the real format), with class-dependent mean brightness."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, per_batch)
        data = np.clip(rng.normal(25 * labels[:, None], 30, (per_batch, 3072)), 0, 255).astype(np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels.tolist()}, f)


SMOKE = [
    "data.dataset=cifar10",
    "data.allow_hub=false",
    "model.width=0.0625",
    "train.epochs=2",
    "train.batch_size=16",
    "train.log_every=1",
    "train.report_to=[]",
    "train.progress=false",
]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cifar_smoke")
    write_cifar_folder(tmp / "cifar-10-batches-py")
    out = tmp / "out"
    cfg = config(None, *SMOKE, f"data.root={tmp}", f"train.output_dir={out}", "compare=[sgd_momentum, adamw]")
    return cfg, out, compare.main(cfg)


@pytest.mark.slow
def test_smoke_writes_the_comparison_table_and_plots(smoke):
    _, out, results = smoke
    assert [r.name for r in results] == ["sgd_momentum", "adamw"]
    table = (out / "comparison.md").read_text().splitlines()
    header = table[2]
    for column in ("optimizer", "lr", "wall time", "final accuracy", "accuracy after 10% of epochs", "peak"):
        assert column in header
    assert len(table) == 4 + len(results) and table[4].startswith("| sgd_momentum | 0.1 |")
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "comparison.json").read_text())
    assert [s["name"] for s in saved] == ["sgd_momentum", "adamw"]
    for r in results:
        # 80 train images / batch 16 = 5 steps per epoch; early eval at 10% of 10 steps = step 1
        assert r.steps == 10 and r.updates_per_epoch == 5 and r.early_epoch == 0.2
        assert 0 <= r.early_accuracy <= 1 and 0 <= r.final_accuracy <= 1
        assert r.peak_memory_bytes > 0 and r.peak_memory_kind in ("rss", "cuda")
        evals = [h["step"] for h in r.history if "eval/accuracy" in h]
        assert evals == [1, 5, 10]
        assert all(math.isfinite(h["train/loss"]) for h in r.history if "train/loss" in h)
        run_dir = out / compare.run_dir_name(recipe.OptimizerChoice(name=r.name))
        assert json.loads((run_dir / "metrics.json").read_text())["final"]["steps"] == 10
        assert (run_dir / "curves.png").is_file()
    state = {r.name: r.optimizer_state_bytes for r in results}
    n_params = sum(p.numel() for p in recipe.resnet18(width=0.0625).parameters())
    assert state["sgd_momentum"] == 4 * n_params and state["adamw"] == 8 * n_params


@pytest.mark.slow
def test_same_initialization_and_data_for_every_optimizer(smoke):
    _, _, results = smoke
    # the step-1 loss depends only on the initial weights and the first batch
    first_losses = {r.name: r.history[0]["train/loss"] for r in results}
    assert len({round(v, 6) for v in first_losses.values()}) == 1, first_losses


@pytest.mark.slow
def test_resume_latest_reads_finished_runs_back(smoke, capsys):
    cfg, _, results = smoke
    cfg.train.resume_from_checkpoint = "latest"
    again = compare.main(cfg)
    assert [(r.name, r.train_seconds, r.final_accuracy) for r in again] == [
        (r.name, r.train_seconds, r.final_accuracy) for r in results
    ]
    assert "finished earlier" in capsys.readouterr().out


@pytest.mark.slow
def test_single_optimizer_with_checkpoint_and_resume(tmp_path):
    write_cifar_folder(tmp_path / "cifar-10-batches-py")
    out = tmp_path / "out"
    common = [*SMOKE, f"data.root={tmp_path}", f"train.output_dir={out}", "optimizer.name=adam"]
    first = compare.main(config(None, *common, "train.epochs=1", "train.checkpoint_every=5"))[0]
    assert first.steps == 5 and (out / "checkpoints/step_0000005/progress.json").is_file()
    resumed = compare.main(config(None, *common, "train.epochs=2", "train.resume_from_checkpoint=latest"))[0]
    assert resumed.steps == 10 and (out / "metrics.json").is_file() and (out / "comparison.md").is_file()
    # the history before the checkpoint came back with it: the early eval (step 1) and every epoch
    assert [h["step"] for h in resumed.history if "eval/accuracy" in h] == [1, 5, 10]
    assert resumed.early_accuracy == first.early_accuracy and resumed.train_seconds > first.train_seconds


@pytest.mark.slow
def test_eight_bit_forms_run(tmp_path):
    write_cifar_folder(tmp_path / "cifar-10-batches-py")
    cfg = config(
        None, *SMOKE, f"data.root={tmp_path}", f"train.output_dir={tmp_path / 'out'}", "train.epochs=1",
        "compare=[adamw_8bit, adabelief_8bit]",
    )  # fmt: skip
    try:
        results = compare.main(cfg)
    except NotImplementedError as e:
        pytest.skip(f"8-bit optimizer state not implemented yet: {e}")
    params = list(recipe.resnet18(width=0.0625).parameters())
    big = sum(p.numel() for p in params if p.numel() >= 4096)  # 8-bit; smaller tensors keep 32-bit state
    assert big > 0
    for r in results:
        assert r.spec["state_bits"] == 8 and r.steps == 5 and math.isfinite(r.history[-1]["eval/loss"])
        assert r.optimizer_state_bytes < 8 * sum(p.numel() for p in params) - 5 * big


def test_missing_data_fails_with_where_to_put_it(tmp_path):
    cfg = config(None, *SMOKE, f"data.root={tmp_path / 'nothing'}", f"train.output_dir={tmp_path / 'o'}")
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        compare.main(cfg)


# ------------------------------------------------------------------------------- CPU regression (slow)

# Measured with configs/recipes/cifar_resnet18_fmnist_cpu.yaml and train.seed=0, 1, 2 (docs/cifar.md):
# (test accuracy, best of the evaluations after epochs 2 and 3), (mean training loss over epoch 3).
# The test runs seed 0, but another CPU, thread count or torch build changes the round-off and, over
# 189 constant-learning-rate steps, the trajectory: a CI run is a fresh seed. Seed 2 (measured after
# floors had been set from seeds 0-1) took Adam 7 points below the other two, hence wide margins:
# accuracy floor = lowest measured - 0.10, training-loss ceiling = highest measured + 0.15. The best of
# the last two evaluations absorbs the one-evaluation dips of constant-lr SGD (BatchNorm running
# statistics; plain SGD once read 15% between a 52% and a 70%). Chance: 10% and ln 10 = 2.30 nats.
ACC_MARGIN, LOSS_MARGIN = 0.10, 0.15
MEASURED = {
    "sgd": ((0.561, 0.697, 0.634), (0.917, 0.867, 0.977)),
    "sgd_momentum": ((0.765, 0.709, 0.712), (0.764, 0.754, 0.737)),
    "adam": ((0.741, 0.748, 0.676), (0.752, 0.753, 0.770)),
    "adamw": ((0.721, 0.727, 0.707), (0.752, 0.747, 0.774)),
    "amsgrad": ((0.730, 0.733, 0.711), (0.752, 0.744, 0.768)),
    "radam": ((0.559, 0.600, 0.547), (1.473, 1.402, 1.577)),
    "adabelief": ((0.716, 0.716, 0.717), (0.806, 0.802, 0.850)),
    "adamw_8bit": ((0.711, 0.729, 0.695), (0.751, 0.751, 0.762)),
}


def accuracy_floor(name: str) -> float:
    return min(MEASURED[name][0]) - ACC_MARGIN


def loss_ceiling(name: str) -> float:
    return max(MEASURED[name][1]) + LOSS_MARGIN


def train_loss(r, epoch: int) -> float:
    """Mean of the logged training losses (each a mean over 10 steps) within epoch `epoch` (0-based)."""
    lo, hi = epoch * r.updates_per_epoch, (epoch + 1) * r.updates_per_epoch
    pts = [h["train/loss"] for h in r.history if "train/loss" in h and lo < h["step"] <= hi]
    return sum(pts) / len(pts)


# The fixture trains 8 optimizers inside the first test that uses it: ~4 minutes on an idle core, 10-15
# minutes measured on 2 cores shared with other jobs.
REGRESSION_TIMEOUT = 2400


@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    if not DEBIAN_FASHION_MNIST_DIR.is_dir() and not os.environ.get("SHARDWISE_FASHION_MNIST_DIR"):
        pytest.skip("Fashion-MNIST is not installed: `apt-get install dataset-fashion-mnist` (as root)")
    out = tmp_path_factory.mktemp("cifar_regression")
    cfg = config(CPU_CONFIG, f"train.output_dir={out}", "train.progress=false", "train.report_to=[]")
    # One intra-op thread, as the calibration runs: the same round-off on the same CPU, and no OpenMP
    # barriers spinning against other jobs on a shared machine (2 threads there ran 5x slower than 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {r.name: r for r in compare.main(cfg)}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.timeout(REGRESSION_TIMEOUT)
@pytest.mark.parametrize("name", list(MEASURED))
def test_cpu_regression_accuracy_floor(regression, name):
    r = regression[name]
    assert r.steps == 189
    acc = max(h["eval/accuracy"] for h in r.history if h["step"] in (126, 189) and "eval/accuracy" in h)
    loss = train_loss(r, 2)
    assert loss <= loss_ceiling(name), f"{name}: epoch-3 training loss {loss:.4f} > {loss_ceiling(name):.4f}"
    assert acc >= accuracy_floor(name), f"{name}: test accuracy {acc:.4f} < floor {accuracy_floor(name):.4f}"


@pytest.mark.slow
@pytest.mark.timeout(REGRESSION_TIMEOUT)
def test_cpu_regression_original_claims(regression):
    r = regression
    # "Adam ahead of plain SGD early" (original: 71% vs 45% after 10 of 100 epochs). At this scale the test
    # accuracy after 10% of the steps (step 19) is dominated by BatchNorm running statistics that have
    # seen 19 batches, so the claim is checked on the training loss over the first epoch, where Adam led
    # by 0.09, 0.15 and 0.13 nats (seeds 0-2), and on the test accuracy after epoch 2 (step 126). The
    # accuracy after epoch 1 is too noisy to assert: Adam's lead there was +1.4, +10.2 and +29.4 points
    # on the calibration CPU (seeds 0-2), and -6.3 points for seed 0 on another x86 CPU, whose native
    # fused kernel rounds differently (the old and the renovated recipe give identical histories there).
    assert train_loss(r["adam"], 0) < train_loss(r["sgd"], 0)
    at_epoch_2 = {
        n: next(h["eval/accuracy"] for h in r[n].history if h["step"] == 2 * r[n].updates_per_epoch)
        for n in ("adam", "sgd")
    }
    assert at_epoch_2["adam"] >= at_epoch_2["sgd"] - 0.03, at_epoch_2
    # "AdamW >= Adam" (original: 89.1% vs 86.7%). Over 189 steps decoupled decay shrinks the weights by
    # lr * wd * steps = 0.2% in all, so the two are the same algorithm up to noise here: measured, the
    # last-epoch training losses agreed to 0.006 nats; AdamW's test accuracy was 2.0 and 2.1 points lower
    # (seeds 0, 1) and 3.6 points higher (seed 2). Tolerances: 0.03 nats and 4 points.
    assert train_loss(r["adamw"], 2) <= train_loss(r["adam"], 2) + 0.03
    assert r["adamw"].final_accuracy >= r["adam"].final_accuracy - 0.04
    # momentum helps SGD (original: 88.4% vs 72.3%): in training loss; the test accuracy is noisier
    assert train_loss(r["sgd_momentum"], 2) < train_loss(r["sgd"], 2)


# ------------------------------------------------------------------------------------- GPU (-m gpu)

# The original table (ResNet-18, CIFAR-10, batch 128, constant lr). GPU_EPOCHS=10 (default) checks the
# after-10-epochs column, GPU_EPOCHS=100 the final one; floors are 10 points (10 epochs, where the
# constant-lr curves still swing by several points between epochs) or 5 points below.
SEED_TABLE = {
    10: ({"sgd": 0.45, "sgd_momentum": 0.62, "adam": 0.71, "adamw": 0.71}, 0.10),
    100: ({"sgd": 0.723, "sgd_momentum": 0.884, "adam": 0.867, "adamw": 0.891}, 0.05),
}


@pytest.mark.gpu
def test_gpu_full_resnet18_cifar10_matches_the_original_table(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    try:
        load_cifar10(allow_hub=False)
    except FileNotFoundError:
        pytest.skip(f"needs CIFAR-10: set ${CIFAR10_ENV} to the cifar-10-batches-py folder")
    epochs = int(os.environ.get("GPU_EPOCHS", "10"))
    if epochs not in SEED_TABLE:
        pytest.fail(f"GPU_EPOCHS must be one of {sorted(SEED_TABLE)}, got {epochs}")
    seed_acc, margin = SEED_TABLE[epochs]
    cfg = config(
        GPU_CONFIG, f"train.epochs={epochs}", f"train.output_dir={tmp_path}", "data.allow_hub=false",
        "train.checkpoint_every=null", "train.report_to=[]", "train.progress=false",
    )  # fmt: skip
    results = {r.name: r for r in compare.main(cfg)}
    for name, acc in seed_acc.items():
        assert results[name].final_accuracy >= acc - margin, (name, results[name].final_accuracy, acc)
    # Adam ahead of SGD early (after 10% of the epochs)
    assert results["adam"].early_accuracy > results["sgd"].early_accuracy
