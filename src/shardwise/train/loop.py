"""The training loop every recipe runs: :func:`run_training`, one iteration per optimizer update.

:func:`shardwise.train.update.optimizer_steps` does the update mechanics (accumulation, clipping,
schedule, resume, divergence guard); this adds what a run reports and keeps: progress, logged
metrics, evaluations, checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from .accel import describe, make_accelerator
from .checkpoint import Resumed, check_output_dir, load_checkpoint, resume_point, save_checkpoint
from .plan import DataCursor, DataPosition, StepPlan, batches_per_process, plan_steps
from .preempt import StopOnSignal, stopped_error, write_stop_record
from .sections import TrainConfig
from .update import model_loss, optimizer_steps

HISTORY = "history.json"  # in each checkpoint: the metric history up to it (read_history reads it back)


def progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def due(step: int, every: int | None) -> bool:
    """True when a cadence of ``every`` optimizer steps (None = never) falls on ``step``."""
    return every is not None and step % every == 0


def start_run(train: TrainConfig, name: str):
    """The Accelerator for a run of recipe ``name`` writing to ``train.output_dir`` (returned as a Path),
    after refusing an output folder that holds another run (before anything is written), and the
    banner line: engine, processes, device, precision."""
    out = Path(train.output_dir)
    accelerator = make_accelerator(train, str(out))
    resume_spec, is_main = train.resume_from_checkpoint, accelerator.is_main_process
    check_output_dir(out, resume=resume_spec, overwrite=train.overwrite, is_main=is_main)
    accelerator.print(f"== {name}: {describe(accelerator)}")
    return accelerator, out


def record_config(accelerator, cfg, out: Path, name: str) -> None:
    """The resolved config as ``out/config.yaml`` and as the trackers' hyperparameters (TensorBoard)."""
    from shardwise.configfile import save_config

    from .metrics import flat_config

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    accelerator.init_trackers(name, config=flat_config(cfg))  # no-op when report_to is []


def plan_run(accelerator, train_dl, train: TrainConfig, out: Path) -> tuple[Resumed, StepPlan]:
    """Where the run starts and how many optimizer steps it makes, before the optimizer is built.

    ``train.resume_from_checkpoint`` ("latest" / "auto", fresh when there is none / a path) gives the
    step, counters and data position to continue from; the plan counts the steps done plus the steps
    the remaining data takes on this number of processes (accelerate splits the global batch list
    evenly over them), so a run resumed on a different world size finishes the same schedule.
    """
    start = resume_point(out, train.resume_from_checkpoint)
    processes = accelerator.num_processes
    plan = plan_steps(
        batches_per_process(train_dl, processes),
        train,
        (start.step, start.position),
        train.batch_size * processes,
    )
    return start, plan


def resume(accelerator, start: Resumed, metrics, scheduler=None) -> None:
    """Load the checkpoint :func:`plan_run` found (none: a fresh run) into the prepared objects,
    continue its metric history so the curves keep the earlier steps, and say so (with the LR the
    restored ``scheduler`` continues at, when given)."""
    if start.path is None:
        return
    load_checkpoint(accelerator, start.path)
    metrics.history = read_history(start.path)
    lr = f" (lr {scheduler.get_last_lr()[0]:.3g})" if scheduler is not None else ""
    accelerator.print(f"resumed from {start.path} at step {start.step}{lr}")


def final_metrics(metrics, result: TrainResult, started: float) -> dict:
    """A run's last evaluation, last train loss, step counts and times (``started``: perf_counter)."""
    return {
        **metrics.last("eval/"),
        "train/loss": metrics.last("train/loss").get("train/loss", float("nan")),
        "steps": result.steps,
        "skipped_steps": result.skipped_steps,
        "train_seconds": round(result.train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
    }


def report(accelerator, metrics, final: dict, out: Path, title: str, lines: tuple[str, ...] = ()) -> None:
    """metrics.json, curves.png and the end-of-run summary (table, then where everything is)."""
    from .metrics import format_table, plot_curves

    metrics_path = metrics.write(out, final)
    if accelerator.is_main_process:
        plot = plot_curves(metrics.history, out / "curves.png", title=title)
        accelerator.print(format_table(final))
        for line in (
            f"plot:    {plot}",
            *lines,
            f"metrics: {metrics_path}",
            f"config:  {out / 'config.yaml'}",
        ):
            accelerator.print(line)
        if accelerator.trackers:  # accelerate skips a tracker whose package is missing
            accelerator.print(f"logs:    {out / 'logs'} ({', '.join(t.name for t in accelerator.trackers)})")


def read_history(checkpoint: Path) -> list[dict]:
    """The metric history a checkpoint of :func:`run_training` carries ([] for older checkpoints)."""
    import json

    path = Path(checkpoint) / HISTORY
    return json.loads(path.read_text()) if path.is_file() else []


@dataclass(frozen=True)
class TrainResult:
    steps: int  # optimizer updates done, a resumed run's earlier ones included
    skipped_steps: int  # updates the divergence guard skipped, over the whole run
    train_seconds: float  # wall time of the loop (final evaluation included), plus seconds_before


def run_training(
    accelerator,
    model,
    train_dl,
    optimizer,
    scheduler,
    plan: StepPlan,
    train: TrainConfig,
    *,
    evaluate: Callable[[], dict[str, float]],
    metrics,
    output_dir: Path,
    start_step: int = 0,
    skipped_steps: int = 0,
    seconds_before: float = 0.0,
    loss_fn: Callable = model_loss,
    count_targets: Callable | None = None,
    eval_at_steps: Collection[int] = (),
    position: DataPosition | None = None,
) -> TrainResult:
    """The training loop of the recipes, one iteration per optimizer update.

    A progress bar; the train loss every ``log_every`` steps (mean over the updates since the last
    log and over processes, with the LR, epoch and skipped-update count); ``evaluate()`` every
    ``eval_every`` steps (default: every epoch) and at each step of ``eval_at_steps`` (0 = the initial
    weights, before the first update, so every curve starts from the baseline; also with
    ``train.eval_at_start``); a checkpoint every
    ``checkpoint_every`` steps, but only after a good update; and a last evaluation of the final
    weights. ``metrics`` is a :class:`~shardwise.train.metrics.Metrics`; ``loss_fn(model, batch)``
    computes a micro-batch's loss (default: the transformers model's own ``.loss``); with
    ``count_targets(batch)`` it returns ``(sum, count)`` and an update's loss is the mean over all target
    tokens of the update (all micro-batches, all processes): see
    :func:`shardwise.train.update.optimizer_steps`.

    Resuming: ``start_step``, ``skipped_steps``, ``seconds_before`` and ``position`` carry a resumed
    run's counts (each checkpoint stores the last three in its ``meta``, the metric history in
    ``history.json``); :func:`shardwise.train.checkpoint.resume_point` reads them back.

    Preemption: a signal of ``train.stop_signals`` on any process stops every process after the same
    optimizer step, which is checkpointed; then :class:`~shardwise.train.preempt.Stopped` is raised
    (exit code 75 under ``exit_on_error``). See :mod:`shardwise.train.preempt`.
    """
    say = accelerator.print
    bar = progress(plan.total_steps, start_step, "train", accelerator.is_main_process and train.progress)
    extra_evals = set(eval_at_steps) | ({0} if train.eval_at_start else set())
    started = time.perf_counter()

    def log_evaluation(step: int) -> None:
        evaluation = evaluate()
        metrics.log(step, evaluation)
        say(f"\nstep {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in evaluation.items()))

    step, window, last_eval_step = start_step, [], -1  # window: per-update losses since the last log
    if start_step == 0 and 0 in extra_evals:
        log_evaluation(0)

    def checkpoint(step: int, data: DataPosition | None) -> Path:
        seconds = seconds_before + time.perf_counter() - started
        meta = {"skipped_steps": skipped_steps, "train_seconds": seconds}
        if data is not None:  # the samples consumed: a resume on any number of processes continues there
            meta["data"] = {"epoch": data.epoch, "samples": data.samples}
        history = {HISTORY: metrics.history}
        return save_checkpoint(accelerator, output_dir, step, train.keep_last, meta=meta, extra_files=history)

    cursor = DataCursor(position)  # optimizer_steps keeps it at the samples consumed
    updates = optimizer_steps(
        accelerator, model, train_dl, optimizer, scheduler, plan, train, start_step,
        loss_fn=loss_fn, cursor=cursor, count_targets=count_targets,
    )  # fmt: skip
    with StopOnSignal(train.stop_signals, accelerator) as stop:
        for step, epoch, loss, skipped in updates:
            bar.update(1)
            if skipped:  # non-finite loss or gradients: the optimizer left everything untouched
                skipped_steps += 1
                say(f"\nstep {step}: non-finite loss or gradients, update skipped ({skipped_steps} so far)")
            else:
                window.append(loss)
            if due(step, train.log_every) or step == plan.total_steps:
                mean = (
                    torch.stack(window).mean() if window else torch.tensor(float("nan"), device=loss.device)
                )
                train_loss = accelerator.reduce(mean, "mean").item()  # over processes
                lr = scheduler.get_last_lr()[0]
                values = {"train/loss": train_loss, "train/lr": lr, "train/epoch": epoch}
                metrics.log(step, {**values, "train/skipped_steps": skipped_steps})
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", skipped=skipped_steps)
                window.clear()
            # a scheduled evaluation still runs at the stop step: it draws from the RNG (its data-loader
            # iterator's seed), so skipping it would change a resumed run's dropout masks
            if due(step, train.eval_every or plan.updates_per_epoch) or step in extra_evals:
                log_evaluation(step)
                last_eval_step = step
            stopping = step < plan.total_steps and stop.agreed(accelerator.device)  # collective, every step
            step_end = time.monotonic()
            if stopping:
                bar.close()
                stop.saving = True  # later signals: acknowledged, the save goes on
            saved = None
            if due(step, train.checkpoint_every) and not skipped:
                saved = checkpoint(step, cursor.position)
            if stopping:
                saved = saved or checkpoint(step, cursor.position)
                error = stopped_error(
                    signal_name=stop.signal_name(),
                    step=step,
                    total=plan.total_steps,
                    checkpoint=saved,
                    seconds=time.monotonic() - (stop.first_at or step_end),
                    save_seconds=time.monotonic() - step_end,
                )
                if accelerator.is_main_process:
                    record = {"step": step, "signal": stop.signal_name(), "checkpoint": str(saved)}
                    write_stop_record({**record, "exit_code": error.exit_code})
                accelerator.end_training()  # flush the trackers
                raise error
    bar.close()
    if last_eval_step != step:  # always finish with an evaluation of the final weights
        metrics.log(step, evaluate())
    return TrainResult(step, skipped_steps, seconds_before + time.perf_counter() - started)
