"""Does 8-bit optimizer state cost accuracy? The demo fine-tune, run with 32- and 8-bit state.

Runs ``recipes/finetune_bert.py`` on the demo config (all-MiniLM-L6-v2 on Reuters R8, from the
offline asset cache: ``make assets``) once per ``state_bits`` (and optionally per variant), same
seed and data order, then plots the training-loss curves side by side and records the final eval
metrics. Not a test: it trains real models for a few minutes.

    python bench/quality_8bit.py                     # adam, 32 vs 8 bit
    python bench/quality_8bit.py --variants adam adabelief --max-steps 60

Writes ``bench/results/quality_8bit.json`` and ``bench/results/quality_8bit.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def run(variant: str, bits: int, max_steps: int | None, out_root: Path) -> dict:
    out = out_root / f"{variant}_{bits}bit"
    cmd = [
        sys.executable,
        str(ROOT / "recipes" / "finetune_bert.py"),
        "--config",
        str(ROOT / "configs" / "recipes" / "bert_minilm_r8.yaml"),
        f"optimizer.state_bits={bits}",
        f"optimizer.variant={variant}",
        f"train.output_dir={out}",
        "train.progress=false",
        "train.report_to=[]",
        "train.overwrite=true",  # a rerun of the bench replaces its own earlier runs
    ]
    if max_steps:
        cmd.append(f"train.max_steps={max_steps}")
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    metrics = json.loads((out / "metrics.json").read_text())
    curve = [(h["step"], h["train/loss"]) for h in metrics["history"] if "train/loss" in h]
    return {"variant": variant, "state_bits": bits, "final": metrics["final"], "train_loss": curve}


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        steps, losses = zip(*r["train_loss"])
        style = "-" if r["state_bits"] == 32 else "--"
        acc = r["final"].get("eval/accuracy")
        label = f"{r['variant']} {r['state_bits']}-bit" + (
            f" (eval acc {acc:.3f})" if acc is not None else ""
        )
        ax.plot(steps, losses, style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss")
    ax.set_title("MiniLM on Reuters R8: 32-bit vs 8-bit optimizer state")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["adam"])
    parser.add_argument("--max-steps", type=int, default=None, help="cut each run short (default: full demo)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_quality_8bit")
    args = parser.parse_args()
    runs = [run(v, bits, args.max_steps, args.out) for v in args.variants for bits in (32, 8)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality_8bit.json").write_text(json.dumps({"runs": runs}, indent=2))
    plot(runs, RESULTS / "quality_8bit.png")
    print("\n| variant | state | eval accuracy | eval macro-F1 | final train loss |\n|---|---|---|---|---|")
    for r in runs:
        f = r["final"]
        print(
            f"| {r['variant']} | {r['state_bits']}-bit | {f.get('eval/accuracy', float('nan')):.4f} | "
            f"{f.get('eval/macro_f1', float('nan')):.4f} | {r['train_loss'][-1][1]:.4f} |"
        )
    print(f"\nwrote {RESULTS / 'quality_8bit.json'} and {RESULTS / 'quality_8bit.png'}")


if __name__ == "__main__":
    main()
