"""The pieces of preemption handling, in-process: the signal handler and the exit path, the data
position arithmetic of an N -> M resume, resume_from_checkpoint=auto, the output-folder checks."""

from __future__ import annotations

import errno
import os
import signal

import pytest

from shardwise.errors import CheckpointError, exit_on_error
from shardwise.train.checkpoint import _disk_full, check_output_dir, check_writable, find_checkpoint
from shardwise.train.plan import DataPosition, plan_steps
from shardwise.train.preempt import (
    EXIT_STOPPED,
    StopOnSignal,
    signal_number,
    stopped_error,
    write_stop_record,
)
from shardwise.train.sections import TrainConfig

# ----------------------------------------------------------------------------------------------------
# signals


def test_signal_sets_a_flag_and_handlers_are_restored(capfd):
    before = signal.getsignal(signal.SIGUSR1)
    with StopOnSignal(["SIGUSR1", "TERM"]) as stop:
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.agreed() and stop.signal_name() == "SIGUSR1"
        stop.saving = True
        os.kill(os.getpid(), signal.SIGUSR1)  # a second one during the save: acknowledged only
    assert signal.getsignal(signal.SIGUSR1) is before
    err = capfd.readouterr().err
    assert "SIGUSR1: stopping after the current optimizer step" in err
    assert "SIGUSR1 again: finishing the checkpoint being written" in err


def test_signal_names_are_checked():
    assert signal_number("usr1") == signal.SIGUSR1 and signal_number("SIGTERM") == signal.SIGTERM
    with pytest.raises(ValueError, match="cannot be caught"):
        signal_number("SIGKILL")
    with pytest.raises(ValueError, match="stop_signals: 'SIGFOO' is not a signal"):
        TrainConfig(stop_signals=["SIGFOO"])
    assert TrainConfig().stop_signals == ["SIGTERM", "SIGINT", "SIGUSR1"]


def test_stopped_exits_75_with_one_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SHARDWISE_STOP_FILE", str(tmp_path / "stop.json"))
    assert write_stop_record({"step": 3}) == tmp_path / "stop.json"
    err = stopped_error(signal_name="SIGTERM", step=3, total=8, checkpoint=tmp_path / "c", seconds=1.25)
    with pytest.raises(SystemExit) as info, exit_on_error():
        raise err
    assert info.value.code == EXIT_STOPPED
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("stopped: SIGTERM: stopped at optimizer step 3/8; checkpoint")
    assert "1.2s after the signal" in lines[0] and "resume_from_checkpoint=auto" in lines[1]
    monkeypatch.setenv("RANK", "1")  # other ranks stop silently (rank 0 speaks for all)
    with pytest.raises(SystemExit) as info, exit_on_error():
        raise err
    assert info.value.code == EXIT_STOPPED and capsys.readouterr().err == ""


def test_ctrl_c_outside_the_loop_is_one_line(capsys):
    with pytest.raises(SystemExit) as info, exit_on_error():
        raise KeyboardInterrupt
    assert info.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted (SIGINT): no checkpoint written by this stop"


# ----------------------------------------------------------------------------------------------------
# N -> M data position


def test_data_position_resume_arithmetic():
    # 2 processes x 16: 3 micro-batches each = 96 samples of 256
    pos = DataPosition.after(0, 3, 32, 256)
    assert pos == DataPosition(0, 96)
    assert pos.resume(16) == (0, 6, 0)  # 1 process: skip 6 of its batches, exact
    assert pos.resume(32) == (0, 3, 0)
    assert DataPosition(0, 80).resume(32) == (0, 2, 16)  # rounds down: 16 samples trained twice
    # the end of an epoch (the last global batch padded by accelerate) -> the next epoch's start
    assert DataPosition.after(1, 9, 32, 256) == DataPosition(2, 0)
    assert DataPosition.after(1, 8, 32, 256) == DataPosition(2, 0)


# ----------------------------------------------------------------------------------------------------
# resume_from_checkpoint=auto


def test_auto_starts_fresh_then_resumes(tmp_path):
    assert find_checkpoint(tmp_path, "auto") is None
    check_output_dir(tmp_path, resume="auto", overwrite=False, is_main=True)  # fresh: accepted
    ckpt = tmp_path / "checkpoints" / "step_0000004"
    ckpt.mkdir(parents=True)
    (ckpt / "progress.json").write_text('{"step": 4}\n')
    assert find_checkpoint(tmp_path, "auto") == ckpt
    (tmp_path / "checkpoints" / "step_0000004" / "progress.json").unlink()  # incomplete only: refused
    with pytest.raises(CheckpointError, match="already holds another run's checkpoints"):
        check_output_dir(tmp_path, resume="auto", overwrite=False, is_main=True)


# ----------------------------------------------------------------------------------------------------
# the output folder


def test_output_dir_that_is_a_file_or_on_a_missing_drive(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match=r"is a file, not a folder"):
        check_writable(tmp_path / "f")
    with pytest.raises(CheckpointError, match=r"f is a file, not a folder"):
        check_writable(tmp_path / "f" / "run")
    with pytest.raises(CheckpointError, match=r"/mnt/shardwise-no-such-drive does not exist \(a drive"):
        check_writable("/mnt/shardwise-no-such-drive/runs/a")
    with pytest.raises(CheckpointError, match=r"/shardwise-no-such-top does not exist"):
        check_writable("/shardwise-no-such-top/run")
    check_writable(tmp_path / "new" / "deeper")  # an ordinary new folder is created
    assert (tmp_path / "new" / "deeper").is_dir() and not list((tmp_path / "new" / "deeper").iterdir())


def test_unwritable_output_dir(tmp_path, capsys):
    """A folder this process cannot write: read-only for an ordinary user; as root (who writes
    everywhere) sysfs, which refuses new files to everyone."""
    if os.geteuid() == 0:
        target = "/sys/kernel"
        if not os.path.isdir(target):
            pytest.skip("no sysfs here")
    else:
        target = str(tmp_path / "ro")
        os.mkdir(target, 0o555)
    with pytest.raises(SystemExit) as info, exit_on_error():
        check_writable(target)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith(f"error: train.output_dir={target!r} cannot be written: Permission denied"), (
        lines
    )
    assert lines[1].startswith("hint: ")


def test_disk_full_is_recognised():
    assert _disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert _disk_full(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"))
    assert not _disk_full(OSError(errno.EACCES, "Permission denied"))


def test_plan_counts_the_remaining_data_on_the_new_world():
    tiny = TrainConfig(batch_size=16, max_steps=None, epochs=1)
    # same world (1 process, 16 batches): the original plan
    assert plan_steps(16, tiny, (6, DataPosition(0, 96)), 16) == plan_steps(16, tiny)
    # 1 -> 2 processes after 96 samples: 3 of 8 batches done per process, 5 updates left
    assert plan_steps(8, tiny, (6, DataPosition(0, 96)), 32).total_steps == 11
    # 2 -> 1 after 96 samples (step 3): 10 of 16 batches left
    assert plan_steps(16, tiny, (3, DataPosition(0, 96)), 16).total_steps == 13
    # two epochs, accumulation 2, max_steps: enough epochs to reach it
    acc = TrainConfig(batch_size=16, max_steps=20, grad_accum_steps=2)
    plan = plan_steps(8, acc, (3, DataPosition(0, 192)), 32)  # 6 of 8 batches done: 1 update left
    assert plan.total_steps == 20 and plan.epochs == 1 + 4  # epoch 0, then 16 more updates at 4 per epoch
