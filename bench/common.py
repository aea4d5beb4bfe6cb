"""Helpers the benchmark scripts share: machine facts, interleaved timing, state bytes, memory,
ports, the GPT model they train, number formats, JSON output. Each helper exists here once.

Timing rule for every script here: candidates are measured in ONE process with interleaved
repetitions (each repetition times every candidate once, in a rotating order), so that a noisy
neighbour or a frequency change hits all candidates alike; results are reported as the median and
min-max per candidate and as ratios to a baseline measured in the same run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO = BENCH_DIR.parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        # a copy of the tree without .git (a GPU machine) can be told its commit
        sha = out.stdout.strip() or os.environ.get("SHARDWISE_GIT_SHA", "unknown")
        return sha + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("SHARDWISE_GIT_SHA", "unknown")


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def machine_facts(device: str = "cpu") -> dict:
    """Where and with what a result was measured; stored in every results JSON."""
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        mem_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        physical, mem_gib = None, None
    facts = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": _git_sha(),
        "device": device,
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical,
        "memory_gib": mem_gib,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "versions": {
            name: _version(name) for name in ("transformers", "deepspeed", "bitsandbytes", "torchao")
        },
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
        facts["cuda"] = torch.version.cuda
    return facts


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def summarize(times_s: list[float]) -> dict:
    """Median and range of a list of durations in seconds, as milliseconds."""
    ms = [1e3 * t for t in times_s]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "reps": len(ms)}


def interleaved(
    fns: dict[str, Callable[[], None]],
    reps: int,
    warmup: int = 1,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Time each callable ``reps`` times, round-robin in a rotating order; return seconds per call.

    ``warmup`` untimed rounds come first (allocation of lazy state, JIT compilation, caches).
    A callable that raises is dropped from the run; its error is returned under ``"<name>!"``.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    for r in range(warmup + reps):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            if name in errors:
                continue
            try:
                sync(device)
                t0 = time.perf_counter()
                fns[name]()
                sync(device)
                dt = time.perf_counter() - t0
            except Exception as e:  # an anchor that breaks at run time is recorded, not fatal
                errors[name] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
            if r >= warmup:
                times[name].append(dt)
        if log:
            log(f"  round {r + 1}/{warmup + reps}{' (warmup)' if r < warmup else ''}")
    out = {n: t for n, t in times.items() if n not in errors}
    out.update({f"{n}!": e for n, e in errors.items()})
    return out


def tensor_bytes(t: torch.Tensor, seen: set[int] | None = None) -> int:
    """Bytes a tensor holds; unwraps tensor subclasses (torchao's quantized states) into their parts.

    Storages already in ``seen`` are counted once (bitsandbytes shares its code maps).
    """
    seen = set() if seen is None else seen
    if (
        hasattr(t, "__tensor_flatten__")
        and type(t) is not torch.Tensor
        and not isinstance(t, torch.nn.Parameter)
    ):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n), seen) for n in names)
    if hasattr(t, "_local_tensor"):  # DTensor
        t = t._local_tensor
    key = t.untyped_storage().data_ptr() if t.numel() else id(t)
    if key in seen:
        return 0
    seen.add(key)
    return t.numel() * t.element_size()


def state_bytes(opt) -> int:
    """Bytes of optimizer state (all state tensors but ``step``); shardwise's own count when it has one.

    A ``ZeroRedundancyOptimizer`` is measured by the optimizer it wraps (its rank's part).
    """
    inner = getattr(opt, "optim", None)
    if isinstance(inner, torch.optim.Optimizer):
        opt = inner
    if hasattr(opt, "state_bytes"):
        return int(opt.state_bytes())
    seen: set[int] = set()
    total = 0
    for state in opt.state.values():
        for k, v in state.items():
            if k != "step" and torch.is_tensor(v):
                total += tensor_bytes(v, seen)
    return total


def peak_rss_bytes() -> int:
    """High-water resident set size of this process (Linux ru_maxrss is in KiB)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def rss_bytes() -> int:
    """Resident set size of this process now (psutil); the high-water mark when psutil is missing."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return peak_rss_bytes()


def free_port() -> int:
    """A TCP port on localhost that nothing listens on (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> None:
    """The environment a spawned rank needs for ``init_process_group`` (env://) and for DeepSpeed."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )


def spawn_ranks(worker: Callable, world: int, *args, timeout: float):
    """Run ``worker(rank, world, port, *args, out)`` in ``world`` spawned processes and return what the
    first of them puts on ``out`` (rank 0 reports); processes still alive a minute later are killed.
    An exception (e.g. ``queue.Empty`` after ``timeout`` seconds) propagates after the clean-up."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, *args, out)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        return out.get(timeout=timeout)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 5, device: str = "cpu") -> float:
    """Best-of-``reps`` memory bandwidth in bytes/s of ``dst.copy_(src)`` (reads + writes ``nbytes``)."""
    n = nbytes // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path


def unavailable(e: BaseException) -> str:
    """The one-line reason recorded for an anchor that cannot run here."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"unavailable: {type(e).__name__}: {first[:200]}"


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------- the GPT recipe's model
SMOLLM2_ASSET = "models/SmolLM2-135M-Instruct"
# SmolLM2-135M's architecture (its config.json), used when the asset cache is missing or when the
# weights cannot travel (a GPU machine): random init, the same shapes and the same work per step.
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
TINY_LLAMA = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)


def gpt_model(quick: bool, random_init: bool = False):
    """The GPT recipe's model and where it came from: SmolLM2-135M from the asset cache, or (no
    cache, or ``random_init``) its architecture with random init; ``quick``: a tiny Llama."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if quick:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)), "tiny Llama (random init, --quick)"
    from shardwise.data.assets import assets_dir

    path = Path(assets_dir()) / SMOLLM2_ASSET
    if not random_init and (path / "model.safetensors").exists():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), f"assets:{SMOLLM2_ASSET}"
    torch.manual_seed(0)
    why = "requested" if random_init else "no asset cache"
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)), f"SmolLM2-135M config, random init ({why})"


# --------------------------------------------------------------------------------- number formats
def fmt_g(x: float, digits: int = 3) -> str:
    """A number with ``digits`` significant figures, no exponent for everyday magnitudes."""
    if x == 0:
        return "0"
    if abs(x) >= 10 ** (digits - 1):
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def fmt_x(r: float) -> str:
    return f"{r:.2f}x"


def fmt_gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def fmt_mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def machine_line(doc: dict) -> str:
    """Where a results JSON was measured, in one line (the report's "Measured on")."""
    m = doc.get("machine", {})
    dev = m.get("gpu") or f"{m.get('cpu_model', '?')}, {m.get('logical_cpus', '?')} logical CPUs"
    threads = doc.get("config", {}).get("threads", m.get("torch_threads"))
    return (
        f"{dev}; {threads} thread{'s' if threads != 1 else ''}; torch {m.get('torch', '?')}; "
        f"{m.get('date', '?')}; git {m.get('git_sha', '?')}"
    )


def time_ratio(a: dict, b: dict) -> float:
    """Time of row ``a`` over row ``b`` (rows with ``median_ms``): the median of the per-round
    ratios when both rows keep their rounds (``times_ms``, timed in the same rounds, so a slow
    stretch of a shared machine hits both), else the ratio of the medians (older results)."""
    if a.get("times_ms") and b.get("times_ms"):
        return statistics.median(x / y for x, y in zip(a["times_ms"], b["times_ms"], strict=True))
    return a["median_ms"] / b["median_ms"]
