"""CPUOffloadOptimizer on CPU: the "device" is the CPU itself, so the wrapper still keeps separate host
masters, transfer buffers and buckets and runs all of its logic except the CUDA streams.

Why fp32 runs are compared bit for bit: the master is an exact copy of the parameter, the gradient
an exact copy of the gradient, and the inner optimizer runs the same kernel (``impl="auto"``: the
fused CPU kernel) as the non-offloaded optimizer; the update is element-wise (8-bit: per block of
one parameter), so how parameters are bucketed cannot change a bit either.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shardwise.optim import AdamW, CPUOffloadOptimizer, optimizer_and_scheduler, param_groups
from shardwise.optim.offload import MASTER_KEY, HostArena

from .dist_workers import assert_same_state


class Tiny(nn.Module):
    """2-D (embedding, linears; >= 4096 elements: 8-bit state) and 1-D (biases, norm) parameters."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(50, 96)
        self.fc1 = nn.Linear(96, 128)
        self.norm = nn.LayerNorm(128)
        self.fc2 = nn.Linear(128, 50)

    def forward(self, idx):
        h = self.emb(idx).mean(1)
        return self.fc2(self.norm(F.gelu(self.fc1(h))))


def batch(step: int, micro: int = 0):
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randint(0, 50, (16, 8), generator=g), torch.randint(0, 50, (16,), generator=g)


def loss_of(model, step: int, micro: int = 0):
    device = next(model.parameters()).device
    idx, y = batch(step, micro)
    return F.cross_entropy(model(idx.to(device)).float(), y.to(device))


def train(model, opt, steps, *, accum: int = 1, clip: float | None = None, sched=None, nan_at=()):
    for step in steps:
        for micro in range(accum):
            (loss_of(model, step, micro) / accum).backward()
        if step in nan_at:
            model.fc1.weight.grad[0, 0] = float("nan")
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def in_group_order(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def assert_params_equal(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), (i, (x.double() - y.double()).abs().max())


def make(model, offload: bool, **kw):
    kw = {"lr": 1e-2, **kw}
    groups = param_groups(model, 0.1)
    if not offload:
        return AdamW(groups, **kw)
    return CPUOffloadOptimizer(groups, AdamW, **kw)


# ------------------------------------------------------------------------------ offloaded == plain
@pytest.mark.parametrize(
    "bits,overlap,bucket_numel",
    [(32, False, None), (8, False, None), (32, True, 5000), (8, True, 5000)],
)
def test_twenty_steps_offloaded_equal_plain_bit_for_bit(bits, overlap, bucket_numel):
    """The issue's check: 20 steps offloaded vs not, parameters and state dicts compared (bitwise)."""
    plain_model, off_model = Tiny(), Tiny()
    plain = make(plain_model, False, state_bits=bits)
    off = make(off_model, True, state_bits=bits, overlap_backward=overlap, bucket_numel=bucket_numel)
    train(plain_model, plain, range(20))
    train(off_model, off, range(20))
    assert_params_equal(params_of(plain_model), params_of(off_model))
    assert_params_equal(in_group_order(off), off.masters)
    sd = off.state_dict()
    assert MASTER_KEY not in sd  # fp32 parameters: the masters are the parameters
    assert_same_state(plain.state_dict(), sd)  # torch keys / 8-bit codes + <key>_absmax, same order
    if bits == 8:
        assert sd["state"][0]["exp_avg"].dtype == torch.int8 and "exp_avg_absmax" in sd["state"][0]
    else:
        assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert off.state[off_model.emb.weight]["exp_avg"] is off.inner.state[off.masters[0]]["exp_avg"]


def test_any_torch_optimizer_class_inside():
    """torchao's shape: optimizer_class may be any torch.optim.Optimizer (here torch's fused AdamW)."""
    results = []
    for offload in (False, True):
        model = Tiny()
        groups = param_groups(model, 0.1)
        kw = dict(lr=1e-2, fused=True)
        opt = (
            CPUOffloadOptimizer(groups, torch.optim.AdamW, **kw)
            if offload
            else torch.optim.AdamW(groups, **kw)
        )
        train(model, opt, range(10), clip=0.05)
        results.append(params_of(model))
    assert_params_equal(*results)
    assert isinstance(opt.inner, torch.optim.AdamW) and set(opt.state_dict()["state"][0]) == {
        "step",
        "exp_avg",
        "exp_avg_sq",
    }


def test_bf16_params_fp32_master_exact_on_the_same_gradients():
    """bf16 parameters with an fp32 master follow the fp32 run exactly when given the same gradients
    (bf16-representable ones): master == fp32 parameters, device parameters == them rounded."""
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 96), (96,), (3, 5000)]
    ref = [nn.Parameter(torch.randn(s, generator=g).bfloat16().float()) for s in shapes]
    dev = [nn.Parameter(p.detach().bfloat16()) for p in ref]
    plain = AdamW(ref, lr=1e-4)  # updates far below bf16's resolution: only a master keeps them
    off = CPUOffloadOptimizer(dev, lr=1e-4, bucket_numel=6000)
    naive = [nn.Parameter(p.detach().clone()) for p in dev]
    naive_opt = AdamW(naive, lr=1e-4)
    for _ in range(20):
        for a, b, c in zip(ref, dev, naive):
            grad = torch.randn(a.shape, generator=g).bfloat16()
            a.grad, b.grad, c.grad = grad.float(), grad.clone(), grad.clone()
        plain.step(), off.step(), naive_opt.step()
    for a, b, m in zip(ref, dev, off.masters):
        assert m.dtype == torch.float32 and torch.equal(m, a.detach())
        assert b.dtype == torch.bfloat16 and torch.equal(b.detach(), a.detach().bfloat16())
    # what the master is for: plain AdamW on the bf16 parameters rounds these small updates away
    assert not any(torch.equal(c.detach(), a.detach().bfloat16()) for c, a in zip(naive, ref))
    assert off.host_bytes()["buffers"] == sum(p.numel() * 2 for p in dev)  # bf16 transfer buffers


def test_bf16_model_close_to_fp32_run():
    """A bf16 model (bf16 forward and backward) with fp32 masters stays within bf16 tolerance of the
    fp32 non-offloaded run, and much closer to it than plain AdamW on the bf16 parameters, whose
    updates below bf16's resolution round away. Measured here: mean |master - fp32| is 6% of the
    mean distance trained, a quarter of the plain bf16 run's."""
    cat = lambda ts: torch.cat([t.detach().float().flatten() for t in ts])
    start = cat(in_group_order(make(Tiny(), False)))
    runs = {}
    for name, dtype, offload in (
        ("ref", None, False),
        ("offload", torch.bfloat16, True),
        ("bf16", torch.bfloat16, False),
    ):
        model = Tiny() if dtype is None else Tiny().to(dtype)
        opt = make(model, offload, lr=1e-3)
        train(model, opt, range(20))
        runs[name] = opt
    ref = cat(in_group_order(runs["ref"]))
    master = cat(runs["offload"].masters)
    moved = (ref - start).abs().mean()
    err = (master - ref).abs()
    assert err.mean() < 0.15 * moved, (err.mean(), moved)
    assert err.max() <= 0.02  # 20 steps of lr 1e-3
    assert err.mean() < 0.5 * (cat(in_group_order(runs["bf16"])) - ref).abs().mean()
    assert torch.equal(cat(in_group_order(runs["offload"])), master.bfloat16().float())  # device = rounded


@pytest.mark.gpu
@pytest.mark.parametrize(
    "overlap,dtype,bits,move_after",
    [
        (False, torch.float32, 32, False),
        (True, torch.float32, 8, False),
        (True, torch.bfloat16, 32, False),
        (False, torch.float32, 32, True),  # built on CPU, model.cuda() after: masters re-pinned
    ],
)
def test_cuda_offload_equals_the_host_update(overlap, dtype, bits, move_after):
    """On a GPU (streams, events, pinned slabs, non_blocking copies): each step equals, bit for bit,
    shardwise AdamW run on the host with the same (CUDA-computed, clipped) gradients; the device
    parameters are the masters rounded to their dtype."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = Tiny().to(dtype) if move_after else Tiny().to("cuda", dtype)
    opt = make(model, True, state_bits=bits, overlap_backward=overlap, bucket_numel=5000)
    if move_after:
        model.cuda()
    ref_groups = [
        {
            "params": [nn.Parameter(p.detach().float().cpu()) for p in g["params"]],
            "weight_decay": g["weight_decay"],
        }
        for g in opt.param_groups
    ]
    ref_opt = AdamW(ref_groups, lr=1e-2, state_bits=bits)
    ref = in_group_order(ref_opt)
    for step in range(10):
        loss_of(model, step).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        for r, p in zip(ref, in_group_order(opt)):
            r.grad = p.grad.detach().float().cpu()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        for r, p, m in zip(ref, in_group_order(opt), opt.masters):
            assert torch.equal(m, r.detach()), step
            assert p.is_cuda and torch.equal(p.detach().cpu(), r.detach().to(dtype)), step
    assert all(s.pinned for s in opt._slots) and all(m.is_pinned() for m in opt.masters)


# ------------------------------------------------------------------------------ state dict, resume
@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_first", [True, False])
def test_exact_resume(bits, dtype, model_first):
    """Train 10, save, fresh model + optimizer, load, train 10 more == 20 uninterrupted, bit for bit
    (bf16: the fp32 masters travel in the state dict), whichever of model / optimizer loads first."""
    full_model = Tiny().to(dtype)
    full = make(full_model, True, state_bits=bits)
    train(full_model, full, range(20))

    model = Tiny().to(dtype)
    opt = make(model, True, state_bits=bits)
    train(model, opt, range(10))
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    assert (MASTER_KEY in saved["opt"]) == (dtype == torch.bfloat16)

    model2 = Tiny(seed=7).to(dtype)
    opt2 = make(model2, True, state_bits=bits)
    if model_first:
        model2.load_state_dict(saved["model"])
        opt2.load_state_dict(saved["opt"])
    else:
        opt2.load_state_dict(saved["opt"])
        model2.load_state_dict(saved["model"])
    train(model2, opt2, range(10, 20))
    assert_params_equal(params_of(full_model), params_of(model2))
    assert_same_state(full.state_dict(), opt2.state_dict())


@pytest.mark.parametrize("direction", ["plain_to_offload", "offload_to_plain"])
def test_state_dict_interchanges_with_the_plain_optimizer(direction):
    ref_model = Tiny()
    ref = make(ref_model, False, state_bits=8)
    train(ref_model, ref, range(20))

    model = Tiny()
    first = make(model, direction == "offload_to_plain", state_bits=8)
    train(model, first, range(10))
    second = make(model, direction == "plain_to_offload", state_bits=8)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    train(model, second, range(10, 20))
    assert_params_equal(params_of(ref_model), params_of(model))


def test_new_model_weights_are_read_into_the_masters():
    """Weights written into the model behind the optimizer's back (load_state_dict) are what it
    steps from next; the same with a plain optimizer gives the same parameters."""
    other = Tiny(seed=3).state_dict()
    results = []
    for offload in (False, True):
        model = Tiny()
        opt = make(model, offload)
        train(model, opt, range(5))
        model.load_state_dict(other)
        train(model, opt, range(5, 10))
        results.append(params_of(model))
    assert_params_equal(*results)


# ------------------------------------------------------------------------------ the training loop
def test_lr_scheduler_reaches_the_inner_optimizer():
    results, lrs = [], []
    for offload in (False, True):
        model = Tiny()
        opt = make(model, offload)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        train(model, opt, range(8), sched=sched)
        results.append(params_of(model))
        lrs.append(opt.param_groups[0]["lr"])
        if offload:
            opt.step()  # pushes the scheduler's lr (set after the last step) to the inner groups
            assert opt.inner.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(1 / 9 * 1e-2)
    assert_params_equal(*results)
    assert lrs[0] == lrs[1]


def test_preset_with_transformers_scheduler():
    model = Tiny()
    opt, sched = optimizer_and_scheduler("llm", model, 10, offload="cpu", state_bits=8)
    assert isinstance(opt, CPUOffloadOptimizer) and opt.inner.state_bits == 8
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    train(model, opt, range(3), sched=sched)
    assert opt.param_groups[0]["lr"] == sched.get_last_lr()[0]
    with pytest.raises(ValueError, match="Invalid offload: 'gpu'"):
        optimizer_and_scheduler("llm", model, 10, offload="gpu")


@pytest.mark.parametrize("overlap", [False, True])
def test_skip_nonfinite(overlap):
    """A NaN gradient skips the step: device parameters, masters and state untouched, the step not
    counted in the state (as shardwise AdamW does), ``skipped_steps`` counts it; same run as plain."""
    results = []
    for offload in (False, True):
        model = Tiny()
        kw = {"overlap_backward": overlap} if offload else {}
        opt = make(model, offload, skip_nonfinite=True, **kw)
        train(model, opt, range(3))
        before = params_of(model)
        masters = [m.clone() for m in opt.masters] if offload else None
        train(model, opt, [3], nan_at={3})
        assert opt.skipped_steps == 1
        assert_params_equal(before, params_of(model))
        if offload:
            assert_params_equal(masters, opt.masters)
            assert opt.state_dict()["state"][0]["step"].item() == 3
        train(model, opt, range(4, 8))
        results.append(params_of(model))
    assert_params_equal(*results)


@pytest.mark.parametrize("overlap", [False, True])
def test_accumulation_and_clipping_between_backward_and_step(overlap):
    """Gradients changed after autograd produced them (accumulated over micro-batches, clipped)
    are the ones stepped on, also when the backward hook copied them early."""
    results = []
    for offload in (False, True):
        model = Tiny()
        kw = {"overlap_backward": overlap, "bucket_numel": 5000} if offload else {}
        opt = make(model, offload, **kw)
        train(model, opt, range(6), accum=3, clip=0.05)  # 0.05: every step is clipped
        results.append(params_of(model))
    assert_params_equal(*results)


@pytest.mark.parametrize("unscale", ["in_step", "explicit", "explicit_then_clip"])
def test_grad_scaler(unscale):
    """torch.amp.GradScaler: its unscale_ writes the gradients without bumping their version, so
    hook copies are never trusted under a scaler; scaled gradients are unscaled in step(); an inf
    skips the step. eps=1e-3 makes the update depend on the gradients' scale (Adam nearly does not)."""
    results = []
    for offload in (False, True):
        model = Tiny()
        opt = make(model, offload, eps=1e-3, **({"overlap_backward": True} if offload else {}))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for step in range(6):
            scaler.scale(loss_of(model, step)).backward()
            if step == 2:
                model.fc1.weight.grad[0, 0] = float("inf")
            if unscale != "in_step":
                scaler.unscale_(opt)
            if unscale == "explicit_then_clip":
                nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        assert scaler.get_scale() == 2.0**9  # the inf step was skipped and halved the scale
        results.append(params_of(model))
    assert_params_equal(*results)


def test_overlap_copies_during_backward():
    model = Tiny()
    opt = make(model, True, overlap_backward=True)
    loss_of(model, 0).backward()
    slots = opt._slots
    assert all(s.copied is not None and s.copied[0]() is s.param.grad for s in slots)
    assert all(torch.equal(s.buf, s.param.grad) for s in slots)


def test_zero_grad_acts_on_device_params():
    model = Tiny()
    opt = make(model, True)
    loss_of(model, 0).backward()
    opt.step()
    assert all(m.grad is None for m in opt.masters)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_params_without_grad_are_skipped():
    model = Tiny()
    model.norm.weight.requires_grad_(False)
    opt = CPUOffloadOptimizer(model.parameters(), lr=1e-2)
    frozen = model.norm.weight.detach().clone()
    loss_of(model, 0).backward()
    model.fc2.bias.grad = None  # like a parameter the loss did not reach
    bias = model.fc2.bias.detach().clone()
    opt.step()
    assert torch.equal(model.norm.weight, frozen) and torch.equal(model.fc2.bias.detach(), bias)
    assert model.norm.weight not in opt.state and model.fc2.bias not in opt.state
    assert model.fc1.weight in opt.state and len(opt.state) == len(list(model.parameters())) - 2


def test_named_params_and_add_param_group():
    model = Tiny()
    named = list(model.named_parameters())  # emb.weight, fc1.{weight,bias}, norm.{..}, fc2.{..}
    opt = CPUOffloadOptimizer(named[:3], lr=1e-2)
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["emb.weight", "fc1.weight", "fc1.bias"]
    opt.add_param_group({"params": named[3:5], "lr": 0.5})
    opt.add_param_group({"params": named[5:]})
    assert opt.inner.param_groups[1]["lr"] == 0.5 and opt.param_groups[2]["lr"] == 1e-2
    assert len(opt.masters) == 7 and opt.param_groups[1]["param_names"] == ["norm.weight", "norm.bias"]
    loss_of(model, 0).backward()
    opt.step()
    assert len(opt.inner.state) == 7


# ------------------------------------------------------------------------------ refusals
def test_refusals(monkeypatch):
    model = Tiny()
    with pytest.raises(ValueError, match="shard=True"):
        CPUOffloadOptimizer(model.parameters(), shard=True)
    with pytest.raises(ValueError, match=r"offload_gradients=True\) is not supported"):
        CPUOffloadOptimizer(model.parameters(), offload_gradients=True)
    with pytest.raises(TypeError, match="torch.optim.Optimizer subclass"):
        CPUOffloadOptimizer(model.parameters(), optimizer_class=dict)
    placeholder = nn.Parameter(torch.zeros(0))
    placeholder.ds_id = 0  # DeepSpeed ZeRO-3 (zero.Init)
    with pytest.raises(ValueError, match="offload_optimizer"):
        CPUOffloadOptimizer([placeholder])
    from shardwise.optim import offload

    monkeypatch.setattr(offload.sharding, "is_dtensor", lambda t: t is model.fc1.weight)
    with pytest.raises(ValueError, match="CPUOffloadPolicy"):
        CPUOffloadOptimizer(model.parameters())
    monkeypatch.undo()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="offload_optimizer"):
        CPUOffloadOptimizer(model.parameters())


def test_deepspeed_style_parameter_swap_refused_at_step():
    """DeepSpeed ZeRO replaces a client optimizer's parameters by flat fp32 partitions."""
    model = Tiny()
    opt = CPUOffloadOptimizer(model.parameters())
    flat = nn.Parameter(torch.cat([p.detach().flatten() for p in model.parameters()]))
    flat.grad = torch.zeros_like(flat)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="offload_optimizer"):
        opt.step()


def test_swapped_parameter_of_same_shape_is_adopted():
    """accelerate re-binds parameters it replaced (``_switch_parameters``): a new tensor of the same
    shape takes the old one's place, master and state (here with the same values: nothing changes)."""
    ref_model = Tiny()
    ref = make(ref_model, False)
    train(ref_model, ref, range(6))
    model = Tiny()
    opt = make(model, True)
    train(model, opt, range(3))
    fresh = nn.Parameter(model.fc1.weight.detach().clone())
    for g in opt.param_groups:
        g["params"] = [fresh if p is model.fc1.weight else p for p in g["params"]]
    model.fc1.weight = fresh
    train(model, opt, range(3, 6))
    assert fresh in opt.state
    assert_params_equal(params_of(ref_model), params_of(model))


# ------------------------------------------------------------------------------ host memory
def test_host_arena_slabs_are_powers_of_two():
    arena = HostArena(pin=False, slabs=True, slab_bytes=4096)
    a = arena.empty((100,), torch.float32)  # 400 B -> 448 with alignment
    b = arena.empty((3, 7), torch.bfloat16)
    c = arena.empty((1500,), torch.float32)  # 6000 B: its own 8192-B slab
    d = arena.empty((10,), torch.float64)  # fits the first slab's tail
    slabs = [s[0] for s in arena._slabs]
    assert [s.numel() for s in slabs] == [4096, 8192]
    assert all(t.data_ptr() % 64 == 0 for t in (a, b, c, d))
    a.fill_(1), b.fill_(2), c.fill_(3), d.fill_(4)
    assert a.eq(1).all() and b.eq(2).all() and c.eq(3).all() and d.eq(4).all()  # no overlap
    assert arena.allocated_bytes() == 4096 + 8192


def test_masters_carved_from_slabs_train_like_plain(monkeypatch):
    """The pinned layout (masters and buffers as views into power-of-two slabs; unpinned here)
    trains bit for bit like one allocation per tensor (bf16 parameters, fp32 masters, buckets)."""
    from shardwise.optim import offload

    class Slabs(HostArena):
        def __init__(self, pin: bool) -> None:
            super().__init__(pin, slabs=True, slab_bytes=1 << 15)

    results = []
    for slabs in (False, True):
        if slabs:
            monkeypatch.setattr(offload, "HostArena", Slabs)
        model = Tiny().to(torch.bfloat16)
        opt = make(model, True, bucket_numel=5000, state_bits=8)
        train(model, opt, range(5))
        results.append(params_of(model) + opt.masters)
    assert all(m._base is not None for m in opt.masters)  # views into slabs
    hb = opt.host_bytes()
    assert 0 <= hb["allocated"] - hb["total"] < 1 << 15  # the slack: the last slab's tail
    assert_params_equal(*results)


@pytest.mark.parametrize("bits,state_bpp", [(32, 8.0), (8, 2.03)])
def test_host_bytes_per_param(bits, state_bpp):
    params = [nn.Parameter(torch.randn(1024, 1024)) for _ in range(2)]
    opt = CPUOffloadOptimizer(params, state_bits=bits)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    n = 2 * 1024 * 1024
    hb = opt.host_bytes()
    assert hb["master"] == 4 * n and hb["buffers"] == 4 * n and hb["scratch"] == 0
    assert hb["state"] / n == pytest.approx(state_bpp, abs=0.005)
    assert hb["total"] == hb["allocated"] == hb["master"] + hb["buffers"] + hb["state"]


def test_cannot_be_pickled():
    opt = CPUOffloadOptimizer(Tiny().parameters())
    with pytest.raises(TypeError, match="state_dict"):
        copy.deepcopy(opt)


# ------------------------------------------------------------------------------ the recipe key
def test_recipe_key_builds_the_offloaded_optimizer(monkeypatch):
    from shardwise.errors import ConfigError
    from shardwise.train.optimizer import build_optimizer, describe_optimizer
    from shardwise.train.sections import OptimizerConfig
    from shardwise.train.update import find_skipping_optimizer

    model = Tiny()
    cfg = OptimizerConfig(offload="cpu", state_bits=8)
    opt, _ = build_optimizer(model, cfg, total_steps=10)
    assert isinstance(opt, CPUOffloadOptimizer) and opt.inner.state_bits == 8
    assert find_skipping_optimizer(opt) is opt and opt.skip_nonfinite
    banner = describe_optimizer(opt, cfg)
    assert banner.startswith("CPUOffloadOptimizer[AdamW](") and "offload=cpu" in banner, banner
    assert "state_bits=8" in banner
    plain, _ = build_optimizer(model, OptimizerConfig(), total_steps=10)
    assert "offload" not in describe_optimizer(plain, OptimizerConfig())
    with pytest.raises(ValueError, match="shard=true"):
        OptimizerConfig(offload="cpu", shard=True)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="offload=cpu under DeepSpeed") as e:
        build_optimizer(model, cfg, total_steps=10)
    assert "offload_optimizer" in e.value.hint


def test_recipe_key_is_validated():
    from shardwise.configfile import from_dict
    from shardwise.train.sections import OptimizerConfig

    assert from_dict(OptimizerConfig, {"offload": "cpu"}).offload == "cpu"
    with pytest.raises(Exception, match="offload"):
        from_dict(OptimizerConfig, {"offload": "gpu"})


@pytest.mark.slow
def test_tiny_gpt_recipe_offloaded_and_resumed_exactly(tmp_path):
    """The GPT recipe with optimizer.offload=cpu (8-bit state): trains, and resumed from its step-4
    checkpoint repeats the uninterrupted run's losses and learning rates exactly."""
    from ..helpers import ensure_assets, metrics, recipe_cmd, run

    ensure_assets("smollm2", "shakespeare")
    common = [
        "optimizer.offload=cpu",
        "optimizer.state_bits=8",
        "train.log_every=1",
        "train.report_to=[]",
        "train.progress=false",
    ]
    full = tmp_path / "full"
    proc = run(recipe_cmd("finetune_gpt.py", "gpt_tiny.yaml", f"train.output_dir={full}", *common))
    assert "CPUOffloadOptimizer[AdamW](" in proc.stdout and "offload=cpu" in proc.stdout
    m = metrics(full)
    assert m["final"]["steps"] == 8 and math.isfinite(m["final"]["eval/loss"])
    losses = [r["train/loss"] for r in m["history"] if "train/loss" in r]
    assert losses[-1] < losses[0], losses

    resumed = tmp_path / "resumed"
    ckpt = full / "checkpoints" / "step_0000004"
    overrides = [f"train.output_dir={resumed}", f"train.resume_from_checkpoint={ckpt}"]
    run(recipe_cmd("finetune_gpt.py", "gpt_tiny.yaml", *overrides, *common))
    assert metrics(resumed)["history"] == m["history"]
    assert metrics(resumed)["final"]["eval/loss"] == m["final"]["eval/loss"]


# ------------------------------------------------------------------------------ DDP, 2 processes
def ddp_worker(rank: int, world: int, bucket_view: bool) -> None:
    """DDP (gloo) with and without offload, overlap_backward requested, clipping: same parameters.
    Ranks start from different weights: DDP's broadcast writes rank 0's into the model behind the
    optimizer's back, which the masters must follow. Then FSDP2 parameters are refused."""
    from .._dist import init_gloo

    init_gloo()
    results = []
    for offload in (False, True):
        model = Tiny(seed=rank)
        opt = make(model, offload, **({"overlap_backward": True} if offload else {}))
        ddp = nn.parallel.DistributedDataParallel(
            model, gradient_as_bucket_view=bucket_view, bucket_cap_mb=0.02
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(5):
                for micro in range(2):
                    idx, y = batch(10 * step + rank, micro)
                    (F.cross_entropy(ddp(idx), y) / 2).backward()
                nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                opt.step()
                opt.zero_grad(set_to_none=step % 2 == 0)
        if offload:
            assert any("process group" in str(w.message) for w in caught), [str(w.message) for w in caught]
        results.append(params_of(model))
    assert_params_equal(*results)
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, [p.sum().item() for p in results[1]])
    assert gathered[0] == gathered[1]
    # FSDP2 (real DTensor parameters): refused, naming its own offload policy
    from torch.distributed.fsdp import fully_shard

    sharded = fully_shard(Tiny())
    with pytest.raises(ValueError, match="CPUOffloadPolicy"):
        CPUOffloadOptimizer(sharded.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("bucket_view", [False, True])
def test_ddp_two_ranks(bucket_view):
    from .._dist import run_workers

    run_workers(ddp_worker, bucket_view, world_size=2)
