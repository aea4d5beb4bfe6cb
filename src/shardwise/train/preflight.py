"""Checks a recipe runs before anything expensive (data loading, model build, process-group start).

Every ordinary mistake fails here, in well under a second, as one ``ConfigError`` / ``DataError``
with a ``hint`` (``exit_on_error`` prints it, exit 2) instead of a traceback minutes into the run:

- the launch: ``train.mixed_precision`` against the device, ``train.report_to`` against accelerate's
  trackers, an accelerate FSDP config on a machine without GPUs;
- the model: the path / hub id (offline-aware), ``model.config_overrides`` keys against the model's
  config class, the data's sequence length against the model's position embeddings;
- the data files (``shardwise.data.text.check_data_files``);
- a resumed run whose config changes a value the checkpoint's schedule fixed (:func:`check_resume`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from shardwise.errors import ConfigError, did_you_mean

from .accel import env_flag
from .sections import TrainConfig

# Keys a resumed run may change: they steer reporting, saving and the process setup, never the
# schedule, the data order or the model. Everything else must equal the checkpoint's run.
RESUMABLE = {
    "train.output_dir",
    "train.resume_from_checkpoint",
    "train.stop_signals",
    # honoured: the step plan and the LR schedule are rebuilt for the new total (train longer / shorter)
    "train.max_steps",
    "train.epochs",
    "compare",  # recipes/cifar_compare.py's list of runs, not how one run trains
    "train.overwrite",
    "train.log_every",
    "train.eval_every",
    "train.eval_at_start",
    "train.eval_batch_size",
    "train.checkpoint_every",
    "train.keep_last",
    "train.report_to",
    "train.progress",
    "train.num_workers",
    "train.collective_timeout_s",
    "train.max_consecutive_skips",
}
RESUMABLE_SECTIONS = ("sample.",)  # what a recipe does after training (generated samples)


def check_launch(train: TrainConfig) -> None:
    """The precision, the trackers and the engine against this machine."""
    from accelerate.utils import LoggerType

    cuda = torch.cuda.is_available()
    if train.mixed_precision == "fp16" and not cuda:
        raise ConfigError(
            "train.mixed_precision=fp16 needs a GPU; this machine has none",
            hint="on CPU use train.mixed_precision=bf16 or no",
        )
    if train.mixed_precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"train.mixed_precision=bf16: {torch.cuda.get_device_name()} has no bf16 support",
            hint="use train.mixed_precision=fp16 or no",
        )
    trackers = [t.value for t in LoggerType]
    for name in train.report_to:
        if name not in trackers:
            raise ConfigError(
                f"train.report_to: unknown tracker {name!r}{did_you_mean(name, trackers)}",
                hint=f"accelerate's trackers: {', '.join(trackers)}; [] for none",
            )
    if env_flag("ACCELERATE_USE_FSDP") and not cuda:
        raise ConfigError(
            "the accelerate config asks for FSDP, which accelerate runs on GPUs only (on CPU it "
            "silently falls back to DDP)",
            hint="on CPU use configs/accelerate/cpu_ddp.yaml or a DeepSpeed config; fsdp2.yaml on GPUs",
        )


def check_model_and_lengths(cfg: Any) -> None:
    """``cfg.model`` (a PretrainedModelConfig) loadable, its overrides real, the lengths it allows."""
    from shardwise.models.pretrained import (
        PretrainedModelConfig,
        check_config_overrides,
        check_model_source,
        max_positions,
    )

    model = getattr(cfg, "model", None)
    if not isinstance(model, PretrainedModelConfig):
        return
    check_model_source(model.name_or_path)
    if model.tokenizer is not None:
        check_model_source(model.tokenizer, "model.tokenizer")
    if not looks_loadable_offline(model.name_or_path) and model.model_type is None:
        return  # a hub model: its config comes with the download (checked reachable above)
    check_config_overrides(model)
    limit = max_positions(model.hf_config())
    data = getattr(cfg, "data", None)
    for key in ("max_length", "block_size"):
        length = getattr(data, key, None)
        if limit is not None and isinstance(length, int) and length > limit:
            raise ConfigError(
                f"data.{key}={length} exceeds the model's {limit} positions",
                hint=f"set data.{key} <= {limit}",
            )


def looks_loadable_offline(name: str) -> bool:
    """An asset or a local folder (its config.json is read without the network)."""
    from shardwise.data.assets import PREFIX

    return name.startswith(PREFIX) or Path(name).expanduser().is_dir()


def check_data(cfg: Any) -> None:
    from shardwise.data.text import check_data_files

    data = getattr(cfg, "data", None)
    if data is not None and hasattr(data, "data_files") and hasattr(data, "text_column"):
        check_data_files(data, label_column=getattr(data, "label_column", None))


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
            if not isinstance(v, dict) or not v:
                out.setdefault(f"{prefix}{k}", v)
        return {k: v for k, v in out.items() if not isinstance(v, dict) or not v}
    return {prefix.rstrip("."): d}


def check_resume(cfg: Any, saved_config: Path) -> None:
    """A resumed run must train what the checkpoint's run trained: the saved schedule, data order and
    model would silently keep the old values of a changed lr, batch size, max_steps, ... So any key
    outside :data:`RESUMABLE` that differs from ``saved_config`` (the run's ``config.yaml``) is refused,
    naming the key. Nothing to compare when the file is missing (a checkpoint copied on its own)."""
    import yaml

    from shardwise.configfile import to_dict

    if not saved_config.is_file():
        return
    old = _flat(yaml.safe_load(saved_config.read_text()) or {})
    new = _flat(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    for key in sorted(set(old) | set(new)):
        if key in RESUMABLE or key.startswith(RESUMABLE_SECTIONS):
            continue
        if old.get(key) != new.get(key):
            raise ConfigError(
                f"{key}={new.get(key)!r} differs from the checkpoint's run ({old.get(key)!r}, "
                f"{saved_config}): a resumed run continues the saved schedule, data order and model",
                hint=f"resume with {key}={old.get(key)!r}, or start a fresh run with the new value "
                "(another train.output_dir, or train.overwrite=true without resume_from_checkpoint)",
            )


def check_resume_from(cfg: Any) -> None:
    """:func:`check_resume` against the config.yaml of the run whose checkpoint will be resumed."""
    from shardwise.errors import CheckpointError

    from .checkpoint import resume_point

    train = cfg.train
    if train.resume_from_checkpoint is None:
        return
    try:
        start = resume_point(Path(train.output_dir), train.resume_from_checkpoint)
    except CheckpointError:
        return  # the recipe's own resume_point reports it with the same message
    if start.path is not None:  # None: resume_from_checkpoint=auto on a fresh folder
        check_resume(cfg, Path(start.path).parent.parent / "config.yaml")


def preflight(cfg: Any) -> None:
    """All of the above for a recipe config with ``train`` (and ``model`` / ``data``) sections."""
    check_launch(cfg.train)
    check_resume_from(cfg)
    check_model_and_lengths(cfg)
    check_data(cfg)
