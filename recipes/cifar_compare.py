"""Compare optimizers on ResNet-18 / CIFAR-10 (or Fashion-MNIST): recipes/cifar_resnet.py once per optimizer.

    python recipes/cifar_compare.py --config configs/recipes/cifar_resnet18_fmnist_cpu.yaml
    python recipes/cifar_compare.py --config configs/recipes/cifar_resnet18_gpu.yaml data.root=/data/cifar

The config is the recipe's plus ``compare``: a list of optimizer names (or mappings like the recipe's
``optimizer`` section). Every entry trains from the same initialization and data order in
``<output_dir>/<name>/`` (metrics.json, curves.png, checkpoints); the sweep then writes
``comparison.md`` (optimizer, lr, wall time, final accuracy, accuracy after 10% of the steps, peak
memory, optimizer state), ``comparison.png`` (test accuracy and losses, one line per optimizer) and
``comparison.json``. With ``train.resume_from_checkpoint=latest`` a finished run is read back, a
started one continues from its newest checkpoint, and one not started yet starts fresh. An empty
``compare`` trains the ``optimizer`` section alone, in ``output_dir`` itself.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the recipe next to this file, also when this file is imported by path
    sys.path.insert(0, str(HERE))

import cifar_resnet as recipe  # noqa: E402
from cifar_resnet import OptimizerChoice, RunResult  # noqa: E402

from shardwise.configfile import parse_args, save_config  # noqa: E402
from shardwise.errors import ConfigError, exit_on_error  # noqa: E402
from shardwise.train.checkpoint import list_checkpoints  # noqa: E402


@dataclass
class Config(recipe.Config):
    # non-empty: train each entry (a name, or a mapping like `optimizer`) instead of `optimizer`
    compare: list[str | OptimizerChoice] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.runs()  # a misspelled name in `compare` fails when the config loads

    def runs(self) -> list[OptimizerChoice]:
        if not self.compare:
            return [self.optimizer]
        runs = [OptimizerChoice(name=c) if isinstance(c, str) else c for c in self.compare]
        dirs = [run_dir_name(r) for r in runs]
        if len(set(dirs)) != len(dirs):
            raise ValueError(f"compare lists the same optimizer twice: {dirs}")
        return runs


def run_dir_name(choice: OptimizerChoice) -> str:
    return choice.label.replace(" ", "").replace("(", "_").replace(")", "").replace(",", "_").replace("=", "")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def comparison_table(results: list[RunResult], title: str) -> str:
    """optimizer | lr | wall time | final acc | acc after 10% of epochs | peak memory | optimizer state."""
    kind = {"cuda": "peak CUDA memory", "rss": "peak RSS"}[results[0].peak_memory_kind]
    lines = [
        f"# {title}",
        "",
        f"| optimizer | lr | wall time | final accuracy | accuracy after 10% of epochs | {kind} "
        "| optimizer state |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.spec['lr']:g} | {r.train_seconds:.1f} s | {100 * r.final_accuracy:.1f}% "
            f"| {100 * r.early_accuracy:.1f}% (epoch {r.early_epoch:g}) | {_mib(r.peak_memory_bytes)} "
            f"| {_mib(r.optimizer_state_bytes)} |"
        )
    return "\n".join(lines) + "\n"


def plot_comparison(results: list[RunResult], path: Path, title: str) -> Path:
    """Test accuracy, test loss and training loss against epochs, one line per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("eval/accuracy", "test accuracy"), ("eval/loss", "test loss"), ("train/loss", "training loss")]
    for r in results:
        for ax, (key, _) in zip(axes, panels, strict=True):
            pts = [(h["step"] / r.updates_per_epoch, h[key]) for h in r.history if key in h]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, label=r.name, marker="o" if len(xs) < 30 else None, markersize=3)
    for ax, (key, name) in zip(axes, panels, strict=True):
        if key.endswith("loss"):
            ax.set_yscale("log")  # early spikes (BN statistics after a few steps) would flatten the rest
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(cfg: Config) -> list[RunResult]:
    runs = cfg.runs()  # validates the compare list before anything runs
    out = Path(cfg.train.output_dir)
    resume = cfg.train.resume_from_checkpoint
    if len(runs) > 1 and resume not in (None, "latest"):
        raise ConfigError(
            "with compare, train.resume_from_checkpoint can only be 'latest' (one per optimizer)",
            hint="train.resume_from_checkpoint=latest continues every optimizer where it stopped",
        )
    results = []
    for choice in runs:
        run_out, run_resume = out, resume
        if len(runs) > 1:
            run_out = out / run_dir_name(choice)
            done = run_out / "metrics.json"
            if resume == "latest" and done.is_file():
                print(f"\n== {choice.label}: finished earlier, reading {done}")
                saved = json.loads(done.read_text())
                results.append(RunResult(**saved["final"], history=saved["history"]))
                continue
            run_resume = resume if list_checkpoints(run_out) else None
        train = replace(cfg.train, output_dir=str(run_out), resume_from_checkpoint=run_resume)
        one = recipe.Config(
            data=cfg.data, model=cfg.model, optimizer=choice, schedule=cfg.schedule, train=train
        )
        results.append(recipe.main(one))  # the same seed: same initialization and data order for each

    from accelerate import PartialState

    if PartialState().is_main_process:
        title = results[0].setup
        table = comparison_table(results, title)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        (out / "comparison.md").write_text(table)
        (out / "comparison.json").write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
        plot = plot_comparison(results, out / "comparison.png", title)
        print("\n" + table)
        print(f"table:  {out / 'comparison.md'}\nplot:   {plot}\nconfig: {out / 'config.yaml'}")
    return results


if __name__ == "__main__":
    with exit_on_error():
        main(parse_args(Config, sys.argv[1:], description=__doc__.split("\n")[0]))
