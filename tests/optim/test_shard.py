"""Shard-aware optimizer: ZeRO-1 (shard=True), FSDP2 DTensor state, DeepSpeed ZeRO, checkpoints.

Multi-process tests run 2 real gloo processes on CPU (tests/_dist.py, hard timeouts); their bodies
are in dist_workers.py. Single-process tests cover layout arithmetic and error messages.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from shardwise.optim import AdamW
from shardwise.optim import checkpoint as ckpt
from shardwise.optim.shard import chunk_bounds, make_partition

from .._dist import run_workers
from . import dist_workers as w


# ----------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 7, 129])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_chunk_bounds_match_torch_chunk_and_dtensor(rows, world):
    t = torch.arange(rows)
    chunks = list(torch.chunk(t, world)) if rows else []
    for r in range(world):
        start, stop = chunk_bounds(rows, world, r)
        expected = chunks[r].tolist() if r < len(chunks) else []
        assert t[start:stop].tolist() == expected
    covered = [i for r in range(world) for i in range(*chunk_bounds(rows, world, r))]
    assert covered == list(range(rows))


def test_shard_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        AdamW([torch.nn.Parameter(torch.zeros(3))], shard=True)


def test_invalid_shard_argument():
    with pytest.raises(ValueError, match="Invalid shard: 'yes'"):
        make_partition(shard_arg="yes", params=[])


def test_sharded_checkpoint_single_process_roundtrip(tmp_path):
    """DCP helpers without a process group (world size 1), 32-bit written, 8-bit loaded."""
    ps = w.make_params()
    opt = AdamW(ps, impl="foreach", amsgrad=True)
    w.train(ps, opt, range(2))
    ckpt.save_sharded(opt, tmp_path / "c")
    q = w.make_params()
    o8 = AdamW(q, impl="foreach", amsgrad=True, state_bits=8)
    ckpt.load_sharded(o8, tmp_path / "c")
    assert o8.state[q[3]]["exp_avg"].dtype == torch.int8  # converted to this optimizer's storage
    o32 = AdamW(w.make_params(), impl="foreach", amsgrad=True)
    o32.load_state_dict(o8.state_dict())
    w.assert_same_state(o32.state_dict(), opt.state_dict(), exact=False)


# ----------------------------------------------------------------------------------------- 2 ranks
def _unsharded_run(bits: int, steps: range, sd=None, params=None):
    ps = params if params is not None else w.make_params()
    opt = AdamW(ps, impl="foreach", state_bits=bits, amsgrad=True)
    if sd is not None:
        opt.load_state_dict(sd)
    w.train(ps, opt, steps)
    return ps, opt


@pytest.mark.slow
def test_zero1_two_ranks(tmp_path):
    """Equality with the unsharded optimizer, bytes per rank, skip agreement, resume 2 -> 1 -> 2."""
    tmp = str(tmp_path)
    for bits in (32, 8):  # saved on 1 rank, loaded on 2 by the workers
        ps, opt = _unsharded_run(bits, range(3))
        sd = copy.deepcopy(opt.state_dict())  # torch's load_state_dict aliases same-dtype tensors
        clones = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        expected, _ = _unsharded_run(bits, range(3, 5), sd=copy.deepcopy(sd), params=clones)
        torch.save(
            {"params": [p.detach() for p in ps], "optim": sd, "expected": [p.detach() for p in expected]},
            os.path.join(tmp, f"one{bits}.pt"),
        )
    run_workers(w.zero1, tmp, timeout=240)

    for bits in (32, 8):  # saved on 2 ranks, loaded on 1
        saved = torch.load(os.path.join(tmp, f"zero{bits}.pt"))
        ps, opt = _unsharded_run(bits, range(3))
        w.assert_params_equal(ps, saved["params"])
        w.assert_same_state(saved["optim"], opt.state_dict())
        resumed = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
        o1 = AdamW(resumed, impl="foreach", state_bits=bits, amsgrad=True)
        o1.load_state_dict(copy.deepcopy(saved["optim"]))
        w.train(resumed, o1, range(3, 5))
        w.train(ps, opt, range(3, 5))
        w.assert_params_equal(resumed, ps)
        # The sharded (DCP) checkpoint written by 2 ranks loads on 1, without a process group.
        o_dcp = AdamW(w.make_params(), impl="foreach", state_bits=bits, amsgrad=True)
        ckpt.load_sharded(o_dcp, os.path.join(tmp, f"dcp{bits}"))
        w.assert_same_state(o_dcp.state_dict(), saved["optim"])


@pytest.mark.slow
def test_fsdp2_dtensor_state(tmp_path):
    """FSDP2 on gloo, 32/8-bit: equality, full/sharded DCP state dicts, resume into fresh models."""
    run_workers(w.fsdp2, str(tmp_path), timeout=240)
    # The full FSDP2 state dict (keys by name) is the unsharded format: 8-bit codes and scales.
    saved = torch.load(tmp_path / "fsdp_full8.pt")
    s = saved["optim"]["state"]["0.weight"]
    assert s["exp_avg"].dtype == torch.int8 and s["exp_avg"].shape == (129, 40)
    assert s["exp_avg_absmax"].shape == (129, 1)


@pytest.mark.slow
def test_accelerate_ddp_save_load_state(tmp_path):
    run_workers(w.accelerate_ddp, str(tmp_path), timeout=240)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_via_accelerate(tmp_path, stage):
    pytest.importorskip("deepspeed")
    run_workers(w.deepspeed_zero, str(tmp_path), stage, timeout=480)


# ----------------------------------------------------------------------------------------- HF Trainer
@pytest.mark.slow
def test_hf_trainer_shard_save_and_resume(tmp_path):
    """transformers.Trainer under 2-process DDP with shard=True: saves (rank 0 only) and resumes."""
    run_workers(w.hf_trainer_shard, str(tmp_path), timeout=300)


@pytest.mark.slow
def test_hf_trainer_shard_without_callback_fails_fast(tmp_path):
    with pytest.raises(AssertionError, match="ShardwiseTrainerCallback"):
        run_workers(w.hf_trainer_shard_no_callback, str(tmp_path), timeout=180)
