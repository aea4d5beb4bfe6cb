"""Metrics: history for trackers and metrics.json, a loss/metric curve PNG, a final table.

Every record is ``{"step": int, "name": value, ...}``; names are ``train/loss``, ``eval/accuracy`` and
so on. ``Metrics.log`` also sends the record to accelerate's trackers (TensorBoard), and the main
process writes ``metrics.json`` (full history + final values) and ``curves.png`` at the end.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any


class Metrics:
    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.history: list[dict[str, Any]] = []

    def log(self, step: int, values: dict[str, float]) -> None:
        values = {k: float(v) for k, v in values.items()}
        self.history.append({"step": step, **values})
        if self.accelerator.trackers:
            self.accelerator.log(values, step=step)

    def last(self, prefix: str = "") -> dict[str, float]:
        """The latest value of every metric whose name starts with ``prefix``."""
        out: dict[str, float] = {}
        for rec in self.history:
            out.update({k: v for k, v in rec.items() if k != "step" and k.startswith(prefix)})
        return out

    def write(self, output_dir: str | Path, final: dict[str, Any]) -> Path:
        """metrics.json = {"final": ..., "history": [...]} (main process only)."""
        path = Path(output_dir) / "metrics.json"
        if self.accelerator.is_main_process:
            path.write_text(json.dumps({"final": final, "history": self.history}, indent=1) + "\n")
        return path


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakMemory:
    """A run's peak memory: CUDA's allocator peak on a GPU, else the process RSS at each ``sample()``."""

    def __init__(self, device) -> None:
        import torch

        self.device, self.cuda = device, device.type == "cuda"
        self.kind = "cuda" if self.cuda else "rss"  # "cuda": max_memory_allocated; "rss": sampled
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self._rss = rss_bytes()

    def sample(self) -> None:
        if not self.cuda:
            self._rss = max(self._rss, rss_bytes())

    @property
    def bytes(self) -> int:
        import torch

        return torch.cuda.max_memory_allocated(self.device) if self.cuda else self._rss


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state: shardwise's own count (8-bit codes and scales), else every state tensor
    but the step counter (torch.optim.SGD's momentum buffers, torch Adam's moments)."""
    import torch

    if hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    tensors = (
        v for s in optimizer.state.values() for k, v in s.items() if torch.is_tensor(v) and k != "step"
    )
    return sum(v.numel() * v.element_size() for v in tensors)


def curve_panels(history: list[dict[str, Any]]) -> list[list[str]]:
    """The panels of ``curves.png``, each a list of metric names: the losses (train and eval together),
    the learning rate, then one per other metric. ``train/epoch`` is not a curve, and
    ``train/skipped_steps`` appears only when the divergence guard skipped an update."""
    names = {k for rec in history for k, v in rec.items() if k != "step" and isinstance(v, (int, float))}
    names.discard("train/epoch")
    if not any(rec.get("train/skipped_steps") for rec in history):
        names.discard("train/skipped_steps")
    panels = [
        [n for n in ("train/loss", "eval/loss") if n in names],
        [n for n in ("train/lr",) if n in names],
    ]
    panels += [[n] for n in sorted(names - {"train/loss", "eval/loss", "train/lr"})]
    return [p for p in panels if p]


def plot_curves(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | str:
    """One panel per metric (train/loss with eval/loss, train/lr, eval/accuracy, ...) against the step.

    Returns the PNG path, or a note saying how to get plots when matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        return "(no plot: matplotlib is not installed; pip install 'shardwise[logging]')"

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for rec in history:
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)):
                series[k].append((rec["step"], v))
    # a shared step axis, so that a single evaluation still shows where in the run it happened
    panels = curve_panels(history)
    last = max((rec["step"] for rec in history), default=1)
    cols = min(3, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, names in zip(axes.flat, panels, strict=False):
        for name in names:
            xs, ys = zip(*series[name], strict=True)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=name)
        ax.set_title(" / ".join(names))
        ax.set_xlabel("optimizer step")
        ax.set_xlim(0, last * 1.03)
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(values: dict[str, Any], title: str = "final metrics") -> str:
    """A two-column text table for the end-of-run summary."""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in values.items()]
    w0 = max([len(k) for k, _ in rows] + [len(title)])
    w1 = max([len(v) for _, v in rows] + [5])
    line = f"+-{'-' * w0}-+-{'-' * w1}-+"
    out = [line, f"| {title:<{w0}} | {'':>{w1}} |", line]
    out += [f"| {k:<{w0}} | {v:>{w1}} |" for k, v in rows]
    out.append(line)
    return "\n".join(out)


def flat_config(cfg: Any) -> dict[str, Any]:
    """A config dataclass as ``{"optimizer.lr": ...}`` with scalar values (TensorBoard hparams)."""
    from shardwise.configfile import to_dict

    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif node is None or isinstance(node, (list, tuple)):
            out[prefix] = str(node)
        else:
            out[prefix] = node

    walk("", to_dict(cfg))
    return out
