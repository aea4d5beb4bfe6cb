"""Config sections every recipe shares: the optimizer (shardwise options) and the training loop.

A recipe composes them into its own top-level dataclass::

    @dataclass
    class RecipeConfig:
        data: MyDataConfig = field(default_factory=MyDataConfig)
        model: PretrainedModelConfig = field(default_factory=...)  # shardwise.models.pretrained
        optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
        train: TrainConfig = field(default_factory=TrainConfig)

Validation of ranges lives in ``__post_init__`` so that ``shardwise.configfile.from_dict`` reports it
with the section's dotted path. The optimizer section checks at load time only what must fail before
anything runs (a typo'd lr, a negative warmup); the optimizer's own validation (betas, eps, ...) is
turned into a ConfigError by ``shardwise.train.optimizer.build_optimizer``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class OptimizerConfig:
    """shardwise AdamW: a named preset (lr, betas, eps, weight decay, schedule) plus explicit overrides.

    ``None`` means "take the preset's value". ``weight_decay`` applies to the decay group only; biases,
    norms and other ndim <= 1 parameters are in the no-decay group (``shardwise.optim.param_groups``).

    ``offload: cpu`` keeps an fp32 master copy of every parameter and the optimizer state (32- or
    8-bit) in host memory and steps there (``shardwise.optim.CPUOffloadOptimizer``, docs/offload.md):
    for single-device or DDP runs whose optimizer state does not fit next to the model. Not with
    ``shard`` (ZeRO-1) nor under DeepSpeed (use its ``offload_optimizer``).
    """

    preset: str = "finetune"
    lr: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    weight_decay: float | None = None
    variant: Literal["adam", "radam", "adabelief"] = "adam"
    amsgrad: bool = False
    impl: Literal["auto", "reference", "foreach", "fused"] = "auto"
    # 8 stores both moments as blockwise 8-bit codes (about 4x less optimizer memory)
    state_bits: Literal[32, 8] = 32
    # ZeRO-1 inside the process group: each rank keeps 1/world of the optimizer state
    shard: bool = False
    # "cpu": master weights + optimizer state in host memory, stepped there (docs/offload.md)
    offload: Literal["none", "cpu"] = "none"
    # any transformers.get_scheduler name (linear, cosine, constant_with_warmup, ...); None = preset's
    schedule: str | None = None
    warmup_ratio: float | None = None
    warmup_steps: int | None = None

    def __post_init__(self) -> None:
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_ratio is not None and self.warmup_steps is not None:
            raise ValueError("set warmup_ratio or warmup_steps, not both")
        if self.amsgrad and self.variant == "radam":
            raise ValueError("amsgrad=true is not defined for variant='radam'")
        if self.offload == "cpu" and self.shard:
            raise ValueError(
                "offload='cpu' with shard=true: offloading keeps this rank's whole optimizer state in host "
                "memory, ZeRO-1 splits it across ranks; pick one (docs/offload.md)"
            )

    def overrides(self) -> dict:
        """The explicitly set optimizer kwargs (None = preset default) for optimizer_and_scheduler."""
        kw = {
            "lr": self.lr,
            "betas": self.betas,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }
        kw = {k: v for k, v in kw.items() if v is not None}
        kw.update(
            variant=self.variant,
            amsgrad=self.amsgrad,
            impl=self.impl,
            state_bits=self.state_bits,
            shard=self.shard,
            offload=self.offload,
        )
        return kw


@dataclass
class TrainConfig:
    """The loop: length, batch, precision, checkpoints, logging. Steps count optimizer updates."""

    seed: int = 42
    epochs: int = 1
    # when set, stop after this many optimizer steps (may end mid-epoch); the schedule uses it
    max_steps: int | None = None
    batch_size: int = 32  # per process
    eval_batch_size: int | None = None  # None = 2 * batch_size
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0  # None disables clipping
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    # recompute activations in backward (transformers models): less memory, ~30% more compute
    gradient_checkpointing: bool = False
    output_dir: str = "outputs/run"
    checkpoint_every: int | None = None  # optimizer steps; None = no intermediate checkpoints
    keep_last: int = 2  # checkpoints kept on disk (oldest deleted first)
    # "latest" = newest checkpoint under output_dir/checkpoints; "auto" = latest when there is one,
    # else a fresh start (one command for the first start and every requeue); or a checkpoint folder
    resume_from_checkpoint: str | None = None
    log_every: int = 10
    eval_every: int | None = None  # optimizer steps; None = at the end of every epoch
    eval_at_start: bool = False  # also evaluate the initial weights (step 0): curves start at the baseline
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # accelerate trackers
    progress: bool = True  # tqdm bars on the main process
    num_workers: int = 0
    # divergence guard: an update whose loss or gradients are not finite is skipped (parameters and
    # optimizer state untouched); this many in a row stop the run with the remedies (exit code 2)
    max_consecutive_skips: int = 5
    # an output_dir that already holds checkpoints or a model is refused unless this is true (its
    # checkpoints are then deleted) or resume_from_checkpoint is set
    overwrite: bool = False
    # a rank blocked in a collective (another rank died or hangs) fails after this long instead of
    # torch's 30 minutes; keep it above the longest checkpoint save
    collective_timeout_s: float = 600.0
    # signals that stop the run gracefully: finish the optimizer step (all processes agree on it), save
    # a checkpoint, exit 75 (shardwise.train.preempt); [] keeps Python's default handling
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])

    def __post_init__(self) -> None:
        at_least_one = ("epochs", "batch_size", "grad_accum_steps", "keep_last", "log_every")
        for name in (*at_least_one, "max_consecutive_skips"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "checkpoint_every", "eval_every", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {value}")
        clip = self.max_grad_norm
        if clip is not None and not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0 or null, got {clip}")
        timeout = self.collective_timeout_s
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"collective_timeout_s must be a finite number > 0, got {timeout}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        import signal

        for name in self.stop_signals:
            key = name.strip().upper()
            key = key if key.startswith("SIG") else f"SIG{key}"
            if key not in signal.Signals.__members__ or key in ("SIGKILL", "SIGSTOP"):
                raise ValueError(f"stop_signals: {name!r} is not a signal that can be caught (e.g. SIGTERM)")

    def eval_batch(self) -> int:
        """The evaluation batch size per process: no gradients are kept, so twice the training one."""
        return self.eval_batch_size or 2 * self.batch_size
