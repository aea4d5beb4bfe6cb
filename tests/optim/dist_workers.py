"""Bodies of the multi-process sharding tests (run by tests/_dist.py in 2 gloo processes).

Each function runs on every rank; plain ``assert`` failures surface in pytest with the rank's
traceback. Data are deterministic functions of a seed, so the test process can recompute what an
unsharded optimizer does and compare.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist

from shardwise.optim import Adam, AdamW
from shardwise.optim import checkpoint as ckpt

from .._dist import init_gloo

# Shapes chosen to hit every layout case on 2 ranks: odd rows (uneven split), 1-D, one row (the
# second rank owns nothing), a 0-d scalar, 8-bit sized matrices (>= 4096
# elements, rows not a multiple of 256), small 2-D ones that keep 32-bit state and a flat 8-bit
# one (1-D, split in whole 256-element blocks, ragged last block).
SHAPES = [(5, 300), (7,), (1, 5000), (3, 4096), (64, 64), (), (9, 3), (33, 130), (5000,)]


def make_params(dtype=torch.float64, shapes=SHAPES) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def set_grads(params, step: int, *, seed: int = 100) -> None:
    g = torch.Generator().manual_seed(seed + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def train(params, opt, steps: range, *, seed: int = 100) -> None:
    for i in steps:
        set_grads(params, i, seed=seed)
        opt.step()


def assert_same_state(a: dict, b: dict, *, exact: bool = True) -> None:
    """Two optimizer state dicts: same param ids, keys, shapes, dtypes and values."""
    assert a["state"].keys() == b["state"].keys(), (sorted(a["state"]), sorted(b["state"]))
    for pid in a["state"]:
        sa, sb = a["state"][pid], b["state"][pid]
        assert list(sa) == list(sb), (pid, list(sa), list(sb))
        for k in sa:
            x, y = sa[k], sb[k]
            assert x.dtype == y.dtype and x.shape == y.shape, (pid, k, x.dtype, y.dtype, x.shape, y.shape)
            if exact:
                assert torch.equal(x, y), (pid, k, (x.double() - y.double()).abs().max())
            else:
                torch.testing.assert_close(x.double(), y.double(), rtol=0, atol=2)
    ga = [{k: v for k, v in g.items() if k != "params"} for g in a["param_groups"]]
    gb = [{k: v for k, v in g.items() if k != "params"} for g in b["param_groups"]]
    assert ga == gb


def assert_params_equal(a, b, atol: float = 0.0) -> None:
    for i, (p, q) in enumerate(zip(a, b)):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=atol, msg=f"param {i}")


# ----------------------------------------------------------------------------------------- ZeRO-1
CASES = [
    # (class, kwargs): every variant and both weight-decay forms, both unfused impls, 32/8-bit
    (AdamW, dict(impl="foreach")),
    (AdamW, dict(impl="reference", amsgrad=True)),
    (Adam, dict(impl="foreach", weight_decay=0.1, variant="radam")),
    (AdamW, dict(impl="foreach", variant="adabelief", amsgrad=True)),
    (AdamW, dict(impl="foreach", state_bits=8)),
    (Adam, dict(impl="reference", state_bits=8, amsgrad=True, weight_decay=0.1)),
]


def zero1(rank: int, world: int, tmp: str) -> None:
    init_gloo()
    # Equality with the unsharded optimizer on identical (DDP-averaged) gradients, float64 and 8-bit.
    for cls, kw in CASES:
        ref, sh = make_params(), make_params()
        o_ref, o_sh = cls(ref, lr=1e-2, **kw), cls(sh, lr=1e-2, shard=True, **kw)
        o_sh.partition.bucket_numel = 4000  # several buckets per step
        for i in range(4):
            set_grads(ref, i)
            set_grads(sh, i)
            o_ref.step()
            o_sh.step()
        assert_params_equal(ref, sh)  # every element sees the same arithmetic: equal, not just close
        assert_same_state(o_ref.state_dict(), o_sh.state_dict())

    # State bytes per rank: 1/world of the unsharded optimizer's, for shapes that split evenly.
    for bits in (32, 8):
        shapes = [(64, 512), (128, 256), (512,), (32, 1024), (8192,)]  # 1-D: split in whole blocks
        ref, sh = make_params(torch.float32, shapes), make_params(torch.float32, shapes)
        o_ref = AdamW(ref, impl="foreach", state_bits=bits)
        o_sh = AdamW(sh, impl="foreach", state_bits=bits, shard=True)
        train(ref, o_ref, range(1))
        train(sh, o_sh, range(1))
        assert o_sh.state_bytes() * world == o_ref.state_bytes(), (
            bits,
            o_sh.state_bytes(),
            o_ref.state_bytes(),
        )

    # Non-finite gradients on one rank's rows only: every rank skips.
    ps = make_params()
    o = AdamW(ps, impl="foreach", shard=True, skip_nonfinite=True)
    before = [p.detach().clone() for p in ps]
    set_grads(ps, 0)
    if rank == world - 1:
        ps[0].grad[-1, 0] = float("nan")  # rows that only the last rank updates
    o.step()
    assert o.skipped_steps == 1
    assert_params_equal(before, ps)

    # Checkpoints across world sizes: save on `world` ranks, load on 1 (in the test process).
    for bits in (32, 8):
        ps = make_params()
        o = AdamW(ps, impl="foreach", state_bits=bits, shard=True, amsgrad=True)
        train(ps, o, range(3))
        sd = o.state_dict()  # collective: every rank gets the full state
        if rank == 0:
            torch.save({"params": [p.detach() for p in ps], "optim": sd}, os.path.join(tmp, f"zero{bits}.pt"))
        # Sharded DCP checkpoint: every rank writes its rows only.
        ckpt.save_sharded(o, os.path.join(tmp, f"dcp{bits}"))
        fresh = make_params()
        with torch.no_grad():
            for p, q in zip(fresh, ps):
                p.copy_(q)
        o2 = AdamW(fresh, impl="foreach", state_bits=bits, shard=True, amsgrad=True)
        ckpt.load_sharded(o2, os.path.join(tmp, f"dcp{bits}"))
        assert o2.state_bytes() == o.state_bytes()
        assert_same_state(o2.state_dict(), sd)
        train(ps, o, range(3, 5))
        train(fresh, o2, range(3, 5))
        assert_params_equal(ps, fresh)

    # prepare_state_dict: gathered once on every rank, then one rank alone may ask (HF Trainer's
    # shape); hyperparameters are read when asked, and the next step drops the prepared copy.
    ps = make_params()
    o = AdamW(ps, impl="foreach", state_bits=8, shard=True)
    train(ps, o, range(2))
    full = o.state_dict()
    o.prepare_state_dict()
    o.param_groups[0]["lr"] = 0.5
    if rank == 0:
        alone = o.state_dict()  # no collective: rank 1 does not call it
        assert alone["param_groups"][0]["lr"] == 0.5
        assert_same_state({"state": alone["state"], "param_groups": full["param_groups"]}, full)
    dist.barrier()
    train(ps, o, range(2, 3))
    assert o._prepared_state_dict is None

    # Save on 1 (written by the test process), load on `world` ranks and continue.
    for bits in (32, 8):
        saved = torch.load(os.path.join(tmp, f"one{bits}.pt"))
        ps = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
        o = AdamW(ps, impl="foreach", state_bits=bits, shard=True, amsgrad=True)
        o.load_state_dict(saved["optim"])
        full_bytes = sum(
            v.numel() * v.element_size()
            for s in saved["optim"]["state"].values()
            for k, v in s.items()
            if k != "step"
        )
        assert o.state_bytes() < 0.75 * full_bytes, (o.state_bytes(), full_bytes)
        assert_same_state(o.state_dict(), saved["optim"])
        train(ps, o, range(3, 5))
        assert_params_equal(ps, saved["expected"])


# ----------------------------------------------------------------------------------------- FSDP2
def _fsdp_model(shard: bool):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    # Uneven shards on 2 ranks: 129 and 33 rows; a 1-row head leaves rank 1 an empty shard.
    model = torch.nn.Sequential(
        torch.nn.Linear(40, 129), torch.nn.Tanh(), torch.nn.Linear(129, 33), torch.nn.Linear(33, 1)
    )
    if shard:
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    return model


def _fsdp_train(model, opt, steps: range) -> None:
    for i in steps:
        x = torch.randn(8, 40, generator=torch.Generator().manual_seed(i))
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _full(p):
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def fsdp2(rank: int, world: int, tmp: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    init_gloo()
    full_opts = StateDictOptions(full_state_dict=True)
    for bits in (32, 8):
        ref = _fsdp_model(False)
        o_ref = AdamW(ref.parameters(), impl="foreach", state_bits=bits)
        model = _fsdp_model(True)
        opt = AdamW(model.parameters(), impl="foreach", state_bits=bits)
        _fsdp_train(ref, o_ref, range(3))
        _fsdp_train(model, opt, range(3))
        assert_params_equal([_full(p) for p in model.parameters()], list(ref.parameters()), atol=1e-6)
        # State lives on the local shard; the 8-bit choice uses the global shape.
        w = model[0].weight
        s = opt.state[w]
        assert s["exp_avg"].to_local().shape == w.to_local().shape
        if bits == 8:
            assert s["exp_avg"].dtype == torch.int8
            assert s["exp_avg_absmax"].shape == (129, 1)
            assert s["exp_avg_absmax"].to_local().shape[0] == w.to_local().shape[0]

        # Full state dict: the unsharded optimizer's state, keyed by parameter name.
        osd = get_optimizer_state_dict(model, opt, options=full_opts)
        names = [n for n, _ in ref.named_parameters()]
        ref_sd = o_ref.state_dict()
        by_name = {
            "state": {i: osd["state"][n] for i, n in enumerate(names)},
            "param_groups": ref_sd["param_groups"],
        }
        assert_same_state(by_name, ref_sd, exact=False)

        # Resume from the full state dict into a fresh model (rank 0 holds it, as after torch.load).
        msd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save({"model": msd, "optim": osd}, os.path.join(tmp, f"fsdp_full{bits}.pt"))
        dist.barrier()
        loaded = (
            torch.load(os.path.join(tmp, f"fsdp_full{bits}.pt")) if rank == 0 else {"model": {}, "optim": {}}
        )
        bcast = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        m2 = _fsdp_model(True)
        o2 = AdamW(m2.parameters(), impl="foreach", state_bits=bits)
        set_model_state_dict(m2, loaded["model"], options=bcast)
        set_optimizer_state_dict(m2, o2, loaded["optim"], options=bcast)
        assert opt.state_bytes() == o2.state_bytes()

        # A plain full optimizer state dict through optim.load_state_dict (param ids, no DCP).
        m3 = _fsdp_model(True)
        set_model_state_dict(m3, copy.deepcopy(msd) if rank == 0 else {}, options=bcast)
        o3 = AdamW(m3.parameters(), impl="foreach", state_bits=bits)
        o3.load_state_dict(copy.deepcopy(ref_sd))
        assert opt.state_bytes() == o3.state_bytes()

        # Sharded DCP: torch's helpers (keys by name) and shardwise's (keys by param id).
        dcp.save(
            {"optim": get_optimizer_state_dict(model, opt)},
            checkpoint_id=os.path.join(tmp, f"fsdp_dcp{bits}"),
        )
        ckpt.save_sharded(opt, os.path.join(tmp, f"fsdp_sw{bits}"))
        m4, m5 = _fsdp_model(True), _fsdp_model(True)
        for m in (m4, m5):
            set_model_state_dict(m, get_model_state_dict(model))
        o4 = AdamW(m4.parameters(), impl="foreach", state_bits=bits)
        o5 = AdamW(m5.parameters(), impl="foreach", state_bits=bits)
        sd4 = {"optim": get_optimizer_state_dict(m4, o4)}
        dcp.load(sd4, checkpoint_id=os.path.join(tmp, f"fsdp_dcp{bits}"))
        set_optimizer_state_dict(m4, o4, sd4["optim"])
        ckpt.load_sharded(o5, os.path.join(tmp, f"fsdp_sw{bits}"))

        _fsdp_train(model, opt, range(3, 5))
        for m, o in ((m2, o2), (m3, o3), (m4, o4), (m5, o5)):
            _fsdp_train(m, o, range(3, 5))
            tol = 0.0 if m is not m3 else 1e-6  # m3 restarted from the unsharded optimizer's state
            assert_params_equal(
                [_full(p) for p in m.parameters()], [_full(p) for p in model.parameters()], atol=tol
            )


# ----------------------------------------------------------------------------------------- accelerate
def _accel_setup(shard: bool, bits: int, accelerator):
    from transformers import get_scheduler

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64))
    opt = AdamW(model.parameters(), lr=1e-2, impl="foreach", state_bits=bits, shard=shard)
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=20)
    return accelerator.prepare(model, opt, sched)


def _accel_train(accelerator, model, opt, sched, steps: range) -> None:
    for i in steps:
        g = torch.Generator().manual_seed(1000 * i + accelerator.process_index)
        x = torch.randn(4, 16, generator=g)
        accelerator.backward(model(x).square().mean())
        opt.step()
        sched.step()
        opt.zero_grad()


def accelerate_ddp(rank: int, world: int, tmp: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    accelerator = Accelerator(cpu=True)
    assert accelerator.distributed_type == DistributedType.MULTI_CPU
    for bits in (32, 8):
        # One Accelerator per run so that save_state / load_state see one model and optimizer.
        acc_ref, acc_sh, acc_res = Accelerator(cpu=True), Accelerator(cpu=True), Accelerator(cpu=True)
        ref = _accel_setup(False, bits, acc_ref)
        sh = _accel_setup(True, bits, acc_sh)
        _accel_train(acc_ref, *ref, range(3))
        _accel_train(acc_sh, *sh, range(3))
        assert_params_equal(list(sh[0].parameters()), list(ref[0].parameters()))
        assert sh[1].optimizer.state_bytes() < 0.6 * ref[1].optimizer.state_bytes()
        out = os.path.join(tmp, f"accel{bits}")
        # save_state with shard=True writes the full state, in the unsharded optimizer's format.
        acc_sh.save_state(out)
        if rank == 0:
            on_disk = torch.load(os.path.join(out, "optimizer.bin"))
            assert_same_state(on_disk, ref[1].state_dict())
        _accel_train(acc_sh, *sh, range(3, 6))
        resumed = _accel_setup(True, bits, acc_res)
        acc_res.load_state(out)
        _accel_train(acc_res, *resumed, range(3, 6))
        assert_params_equal(list(resumed[0].parameters()), list(sh[0].parameters()))


# ----------------------------------------------------------------------------------------- DeepSpeed
def deepspeed_zero(rank: int, world: int, tmp: str, stage: int) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    for bits in (32, 8):
        AcceleratorState._reset_state(reset_partial_state=False)
        config = {
            "train_micro_batch_size_per_gpu": 4,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,  # accelerate would default to 1.0
            "bf16": {"enabled": False},
            "fp16": {"enabled": False},
        }
        accelerator = Accelerator(
            deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config),
            kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
        )
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 4))
        ref = copy.deepcopy(model)
        o_ref = AdamW(ref.parameters(), lr=1e-2, impl="foreach", state_bits=bits)
        target = torch.randn(64, 4, generator=torch.Generator().manual_seed(3))
        data = torch.randn(64, 32, generator=torch.Generator().manual_seed(4))
        n_params = sum(p.numel() for p in model.parameters())
        opt = AdamW(model.parameters(), lr=1e-2, impl="foreach", state_bits=bits)
        engine, opt = accelerator.prepare(model, opt)
        for i in range(6):
            rows = [(i % 4) * 16 + r * 4 for r in range(world)]  # rank r's micro-batch: 4 rows
            mine = slice(rows[rank], rows[rank] + 4)
            loss = (engine(data[mine]) - target[mine]).square().mean()
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            # Unsharded reference on the global batch (DeepSpeed averages the ranks' gradients).
            everyone = torch.cat([torch.arange(r, r + 4) for r in rows])
            (ref(data[everyone]) - target[everyone]).square().mean().backward()
            o_ref.step()
            o_ref.zero_grad()
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            got = [p.detach().clone() for p in engine.module.parameters()]
        # 32-bit: the same optimizer on the same averaged gradients. 8-bit: DeepSpeed hands the
        # optimizer 1-D flat partitions, quantized in blocks of the flat buffer, while the reference
        # quantizes its 2-D weight per row: close, not equal.
        assert_params_equal(got, list(ref.parameters()), atol=1e-6 if bits == 32 else 5e-3)
        # DeepSpeed hands the optimizer flat fp32 partitions: ZeRO shards the state (1/world each).
        base = opt.optimizer.optimizer if hasattr(opt.optimizer, "optimizer") else opt.optimizer
        assert isinstance(base, AdamW), type(base)
        assert base.state_bytes() <= 8 * n_params / world + 64, (base.state_bytes(), n_params)
        if bits == 8:  # the flat buffer (4740 elements) is above the threshold: codes, ~0.13x fp32
            for s in base.state.values():
                assert s["exp_avg"].dtype == torch.int8 and s["exp_avg_sq"].dtype == torch.uint8
            assert base.state_bytes() <= 0.13 * 8 * n_params, (base.state_bytes(), n_params)
        accelerator.free_memory()


# ----------------------------------------------------------------------------------------- HF Trainer
class _Regressor(torch.nn.Module):
    """A Trainer-compatible model: forward(x, labels) -> {"loss": ...}; a 300x16 weight gets 8-bit
    state, the biases and the head keep 32-bit."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(16, 300), torch.nn.Tanh(), torch.nn.Linear(300, 1))

    def forward(self, x, labels):
        return {"loss": (self.body(x).squeeze(-1) - labels).square().mean()}


def _trainer(tmp: str, run: str, *, callback: bool, max_steps: int = 6):
    from transformers import Trainer, TrainingArguments

    from shardwise.optim.hf import ShardwiseTrainerCallback

    g = torch.Generator().manual_seed(7)
    xs = torch.randn(64, 16, generator=g)
    data = [{"x": x, "labels": x.sum() / 4} for x in xs]
    args = TrainingArguments(
        output_dir=os.path.join(tmp, run),
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        use_cpu=True,
        ddp_backend="gloo",
        report_to=[],
        logging_steps=1000,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=0,
    )
    args.device  # noqa: B018 - sets up the process group (gloo), which shard=True needs
    assert dist.is_initialized() and dist.get_world_size() == 2
    model = _Regressor()
    opt = AdamW(model.parameters(), lr=1e-2, impl="foreach", state_bits=8, shard=True)
    callbacks = [ShardwiseTrainerCallback()] if callback else []
    return Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None), callbacks=callbacks)


def hf_trainer_shard(rank: int, world: int, tmp: str) -> None:
    """Trainer saves on rank 0 only; with the callback, sharded state saves and resumes exactly."""
    full = _trainer(tmp, "full", callback=True)
    full.train()
    expected = [p.detach().clone() for p in full.model.parameters()]
    opt = full.optimizer.optimizer  # accelerate's wrapper around ours
    full_state = opt.state_dict()["state"].values()  # a collective, on both ranks
    full_bytes = sum(t.numel() * t.element_size() for s in full_state for k, t in s.items() if k != "step")
    assert opt.state_bytes() < 0.6 * full_bytes  # sharded while training
    ckpt3 = os.path.join(tmp, "full", "checkpoint-3")
    saved = torch.load(os.path.join(ckpt3, "optimizer.pt"), weights_only=True)
    w = saved["state"][0]
    assert w["exp_avg"].shape == (300, 16) and w["exp_avg"].dtype == torch.int8, (w["exp_avg"].shape,)
    assert float(w["step"]) == 3

    resumed = _trainer(tmp, "resumed", callback=True)
    resumed.train(resume_from_checkpoint=ckpt3)
    assert_params_equal(list(resumed.model.parameters()), expected)


def hf_trainer_shard_no_callback(rank: int, world: int, tmp: str) -> None:
    """Without the callback, the rank-0-only save fails at once with the fix in the message."""
    _trainer(tmp, "nocb", callback=False, max_steps=3).train()


def _ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # accelerate would default to 1.0
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }


def _ds_accelerator(config: dict, **plugin_kwargs):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config, **plugin_kwargs),
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
    )


def _ds_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.LayerNorm(128), torch.nn.Tanh(), torch.nn.Linear(128, 4)
    )


def _ds_train(accelerator, engine, opt, steps: int, rank: int) -> None:
    data = torch.randn(64, 32, generator=torch.Generator().manual_seed(4))
    target = torch.randn(64, 4, generator=torch.Generator().manual_seed(3))
    for i in range(steps):
        mine = slice((i % 8) * 8 + rank * 4, (i % 8) * 8 + rank * 4 + 4)
        accelerator.backward((engine(data[mine]) - target[mine]).square().mean())
        opt.step()
        opt.zero_grad()


def deepspeed_groups_and_shard(rank: int, world: int, tmp: str) -> None:
    """Issue 19's bugs under DeepSpeed: (a) ZeRO-3 with zero.Init (accelerate's zero3_init_flag)
    builds the same decay / no-decay groups as ZeRO-2 and trains to the same weights; (b)
    shard=True under DeepSpeed is refused at the first step."""
    import deepspeed

    from shardwise.optim import param_groups

    results = {}
    for stage in (2, 3):
        config = _ds_config(stage)
        accelerator = _ds_accelerator(config, zero3_init_flag=stage == 3)
        if stage == 3:
            with deepspeed.zero.Init(config_dict_or_path=config):
                model = _ds_model()
            assert all(p.numel() == 0 and hasattr(p, "ds_shape") for p in model.parameters())
        else:
            model = _ds_model()
        groups = param_groups(model, 0.1)
        names = {id(p): n for n, p in model.named_parameters()}
        summary = [(g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in groups]
        opt = AdamW(groups, lr=1e-2, impl="foreach")
        engine, opt = accelerator.prepare(model, opt)
        _ds_train(accelerator, engine, opt, 6, rank)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            weights = [p.detach().clone() for p in engine.module.parameters()]
        results[stage] = summary, weights
        accelerator.free_memory()
    assert results[3][0] == results[2][0], results
    no_decay = ["0.bias", "1.bias", "1.weight", "3.bias"]
    assert results[2][0] == [(0.1, ["0.weight", "3.weight"]), (0.0, no_decay)], results[2][0]
    assert_params_equal(results[3][1], results[2][1], atol=1e-6)

    # shard=True under DeepSpeed ZeRO-2: state would be partitioned twice; refused, naming the fix.
    accelerator = _ds_accelerator(_ds_config(2))
    model = _ds_model()
    engine, opt = accelerator.prepare(model, AdamW(model.parameters(), lr=1e-2, shard=True))
    try:
        _ds_train(accelerator, engine, opt, 1, rank)
    except RuntimeError as e:
        assert "Drop shard=True" in str(e), e
    else:
        raise AssertionError("shard=True under DeepSpeed was not refused")
    accelerator.free_memory()


def _ds8_model(aligned: bool = True):
    # Aligned: 16640 + 4352 = 20992 elements = 41 * 512, so DeepSpeed's 2-rank partitions (10496
    # each) start on a multiple of 256 and every 8-bit block lies within one rank. Not aligned:
    # 16640 + 4112 = 20752, partitions of 10376 = 40 * 256 + 136: block 40 straddles the ranks.
    torch.manual_seed(0)
    head = torch.nn.Linear(256, 17, bias=False) if aligned else torch.nn.Linear(256, 16)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), head)


def deepspeed_8bit(rank: int, world: int, tmp: str) -> None:
    """DeepSpeed ZeRO-2 with 8-bit state on DeepSpeed's flat partitions: every rank sees the same
    data, so gradients are bitwise those of one rank and the state must be too. Writes, per bits
    and rank, the partition's state and the trained weights; on 2 ranks also saves and resumes
    through Accelerator.save_state / load_state."""
    import deepspeed

    data = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    target = torch.randn(32, 17, generator=torch.Generator().manual_seed(3))

    def steps(accelerator, engine, opt, rng):
        for i in rng:
            rows = slice((i % 8) * 4, (i % 8) * 4 + 4)  # the same rows on every rank
            out = engine(data[rows])
            accelerator.backward((out - target[rows, : out.shape[1]]).square().mean())
            opt.step()
            opt.zero_grad()

    for bits in (8, 32, "8u"):
        accelerator = _ds_accelerator(_ds_config(2))
        model = _ds8_model(aligned=bits != "8u")
        state_bits = 32 if bits == 32 else 8
        engine, opt = accelerator.prepare(model, AdamW(model.parameters(), lr=1e-2, state_bits=state_bits))
        # Not aligned: one step (later steps differ everywhere, through the forward pass).
        steps(accelerator, engine, opt, range(1 if bits == "8u" else 6))
        base = opt.optimizer.optimizer if hasattr(opt.optimizer, "optimizer") else opt.optimizer
        assert isinstance(base, AdamW), type(base)
        state = {k: v.clone() for k, v in base.state_dict()["state"][0].items()}
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            weights = [p.detach().clone() for p in engine.module.parameters()]
        torch.save(
            {"state": state, "weights": weights, "state_bytes": base.state_bytes()},
            os.path.join(tmp, f"ds{bits}_w{world}_r{rank}.pt"),
        )
        if bits == 8 and world > 1:  # exact save / resume through accelerate
            out = os.path.join(tmp, "ds8_ckpt")
            accelerator.save_state(out)
            steps(accelerator, engine, opt, range(6, 9))
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                expected = [p.detach().clone() for p in engine.module.parameters()]
            accelerator.free_memory()
            accelerator = _ds_accelerator(_ds_config(2))
            model = _ds8_model()
            engine, opt = accelerator.prepare(model, AdamW(model.parameters(), lr=1e-2, state_bits=8))
            accelerator.load_state(out)
            steps(accelerator, engine, opt, range(6, 9))
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                assert_params_equal(list(engine.module.parameters()), expected)
        accelerator.free_memory()


# ----------------------------------------------------------------------------------------- ZeRO-Offload
def _ds_offload_config(stage: int, offload: bool, *, force_ds_cpu_optimizer: bool = False) -> dict:
    config = _ds_config(stage)
    if offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        if not force_ds_cpu_optimizer:
            # Without this key accelerate swaps the client optimizer for DeepSpeedCPUAdam (and
            # DeepSpeed itself would refuse a client optimizer under offload).
            config["zero_force_ds_cpu_optimizer"] = False
    return config


def _ds_base(opt):
    """The client optimizer inside accelerate's wrapper and DeepSpeed's ZeRO optimizer."""
    return opt.optimizer.optimizer if hasattr(opt.optimizer, "optimizer") else opt.optimizer


def deepspeed_offload(rank: int, world: int, tmp: str, stage: int) -> None:
    """Issue 19 (2a): shardwise AdamW as DeepSpeed ZeRO-Offload's optimizer (offload_optimizer:
    cpu, zero_force_ds_cpu_optimizer: false). For 32- and 8-bit state, 6 steps offloaded and not
    offloaded on the same per-rank data; writes each run's gathered weights and this rank's state,
    and checks in place what needs the live engine: DeepSpeed really takes its offload path, the
    client optimizer is ours, its state is on the CPU (8-bit codes where expected), and
    Accelerator.save_state / load_state resume an offloaded run exactly."""
    import deepspeed

    data = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    target = torch.randn(32, 17, generator=torch.Generator().manual_seed(3))

    def steps(accelerator, engine, rng):
        for i in rng:
            rows = slice((i % 4) * 8 + rank * 4, (i % 4) * 8 + rank * 4 + 4)  # different rows per rank
            accelerator.backward((engine(data[rows]) - target[rows]).square().mean())

    def gathered(engine):
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            return [p.detach().clone() for p in engine.module.parameters()]

    def start(offload: bool, bits: int):
        accelerator = _ds_accelerator(_ds_offload_config(stage, offload))
        model = _ds8_model()
        engine, opt = accelerator.prepare(model, AdamW(model.parameters(), lr=1e-2, state_bits=bits))
        return accelerator, engine, opt

    for bits in (32, 8):
        for offload in (False, True):
            accelerator, engine, opt = start(offload, bits)
            zero = engine.optimizer  # DeepSpeed's ZeRO optimizer around ours
            assert (zero.cpu_offload if stage < 3 else zero.offload_optimizer) is offload, type(zero)
            base = _ds_base(opt)
            assert isinstance(base, AdamW), type(base)
            steps(accelerator, engine, range(6))
            tensors = [v for s in base.state.values() for k, v in s.items() if k != "step"]
            assert tensors and all(t.device.type == "cpu" for t in tensors)
            if bits == 8:  # the flat buffer (20992 elements) is above the 8-bit threshold
                for s in base.state.values():
                    assert s["exp_avg"].dtype == torch.int8 and s["exp_avg_sq"].dtype == torch.uint8
            # (base.state, not state_dict(): ZeRO-3 empties the optimizer's param groups between steps)
            state = [{k: v.clone() for k, v in s.items()} for s in base.state.values()]
            torch.save(
                {"weights": gathered(engine), "state": state, "state_bytes": base.state_bytes()},
                os.path.join(tmp, f"off{int(offload)}_b{bits}_r{rank}.pt"),
            )
            if offload:  # save, go on 3 steps; a fresh offloaded run loads the save and must match
                out = os.path.join(tmp, f"off_ckpt{bits}")
                accelerator.save_state(out)
                steps(accelerator, engine, range(6, 9))
                expected = gathered(engine)
                accelerator.free_memory()
                accelerator, engine, opt = start(True, bits)
                accelerator.load_state(out)
                steps(accelerator, engine, range(6, 9))
                assert_params_equal(gathered(engine), expected)
            accelerator.free_memory()


def deepspeed_offload_swapped(rank: int, world: int, tmp: str) -> None:
    """Without "zero_force_ds_cpu_optimizer": false, accelerate (1.x, Accelerator._prepare_deepspeed
    -> map_pytorch_optim_to_deepspeed) silently replaces the client optimizer by DeepSpeedCPUAdam
    built on its param groups (lr, betas, eps, weight_decay per group), with adamw_mode=False (L2
    Adam) for any optimizer that is not a torch.optim.AdamW: decoupled weight decay, state_bits,
    variant and amsgrad are lost."""
    accelerator = _ds_accelerator(_ds_offload_config(2, True, force_ds_cpu_optimizer=True))
    model = _ds8_model()
    engine, opt = accelerator.prepare(model, AdamW(model.parameters(), lr=1e-2, state_bits=8))
    base = _ds_base(opt)
    assert type(base).__name__ == "DeepSpeedCPUAdam" and base.adam_w_mode is False, type(base)
    accelerator.backward(engine(torch.randn(4, 64)).square().mean())
    states = list(base.state.values())
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)  # not 8-bit
    accelerator.free_memory()
