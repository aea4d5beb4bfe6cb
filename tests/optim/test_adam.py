"""The Adam family against torch.optim and an independent AdaBelief, in float64, every impl."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from shardwise.optim import Adam, AdamW
from shardwise.optim.kernels import fused

IMPLS = ["reference", "foreach", "fused"]
VARIANTS = [("adam", False), ("adam", True), ("radam", False), ("adabelief", False), ("adabelief", True)]
STEPS = 25


def _params(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (13,), (3, 4, 6)]
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


def _groups(params, cls_is_adamw):
    # Two groups with different hyperparameters, as real fine-tuning uses (decay / no-decay).
    return [
        {"params": params[:2], "lr": 3e-2, "weight_decay": 0.1},
        {"params": params[2:], "lr": 1e-2, "weight_decay": 0.0 if cls_is_adamw else 0.05},
    ]


def _run(make_opt, params, steps=STEPS, seed=1):
    opt = make_opt(params)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()
    return opt


def _torch_twin(cls, variant, amsgrad, **kw):
    if variant == "adam":
        return lambda ps: (torch.optim.AdamW if cls is AdamW else torch.optim.Adam)(ps, amsgrad=amsgrad, **kw)
    return lambda ps: torch.optim.RAdam(ps, decoupled_weight_decay=cls is AdamW, **kw)


class AdaBeliefPaper(torch.optim.Optimizer):
    """Algorithm 2 of Zhuang et al. (2020), as the authors' adabelief_pytorch 0.2 implements it with
    rectify=False, fixed_decay=False: eps is added into s_t, and bias corrections as in Adam."""

    def __init__(self, params, lr, betas, eps, weight_decay, weight_decouple, amsgrad, maximize):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.weight_decouple, self.amsgrad, self.maximize = weight_decouple, amsgrad, maximize

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                grad = -p.grad if self.maximize else p.grad.clone()  # maximize f = minimize -f
                st = self.state[p]
                if not st:
                    st["step"], st["exp_avg"], st["exp_avg_var"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                    st["max_exp_avg_var"] = torch.zeros_like(p)
                st["step"] += 1
                if self.weight_decouple:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                elif group["weight_decay"] != 0:
                    grad.add_(p, alpha=group["weight_decay"])
                bc1, bc2 = 1 - b1 ** st["step"], 1 - b2 ** st["step"]
                st["exp_avg"].mul_(b1).add_(grad, alpha=1 - b1)
                residual = grad - st["exp_avg"]
                st["exp_avg_var"].mul_(b2).addcmul_(residual, residual, value=1 - b2)
                st["exp_avg_var"].add_(group["eps"])
                if self.amsgrad:
                    torch.max(st["max_exp_avg_var"], st["exp_avg_var"], out=st["max_exp_avg_var"])
                    denom = (st["max_exp_avg_var"].sqrt() / math.sqrt(bc2)).add_(group["eps"])
                else:
                    denom = (st["exp_avg_var"].sqrt() / math.sqrt(bc2)).add_(group["eps"])
                p.addcdiv_(st["exp_avg"], denom, value=-group["lr"] / bc1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("variant", "amsgrad"), VARIANTS)
@pytest.mark.parametrize("cls", [AdamW, Adam])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_independent_reference_float64(cls, variant, amsgrad, impl, maximize):
    kw = dict(betas=(0.9, 0.99), eps=1e-8)
    ours, theirs = _params(), _params()
    _run(lambda ps: cls(_groups(ps, cls is AdamW), variant=variant, amsgrad=amsgrad, impl=impl,
                        maximize=maximize, **kw), ours)  # fmt: skip
    if variant == "adabelief":
        make = lambda ps: AdaBeliefPaper(
            _groups(ps, cls is AdamW), lr=1e-3, weight_decay=0.0,
            weight_decouple=cls is AdamW, amsgrad=amsgrad, maximize=maximize, **kw,
        )  # fmt: skip
    else:
        make = lambda ps: _torch_twin(cls, variant, amsgrad, maximize=maximize, **kw)(
            _groups(ps, cls is AdamW)
        )
    _run(make, theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(("variant", "amsgrad"), VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_impls_agree_low_precision(variant, amsgrad, dtype):
    results = {}
    for impl in IMPLS:
        params = _params(dtype)
        _run(lambda ps, impl=impl: AdamW(ps, lr=1e-2, variant=variant, amsgrad=amsgrad, impl=impl), params)
        results[impl] = params
    # Reference and foreach compute in the parameter dtype (as torch.optim does); fused computes in
    # fp32 and rounds once, so for 16-bit dtypes it is compared within a few ulps of the parameter.
    tol = {torch.float32: 2e-6, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    for impl in ("foreach", "fused"):
        for a, b in zip(results[impl], results["reference"]):
            torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


def test_fused_kernel_builds_here():
    # CI machines have a compiler: the fused path must really be exercised there, not fall back.
    assert fused.available(torch.device("cpu")), fused.why_unavailable(torch.device("cpu"))


def test_state_dict_torch_to_shardwise_and_back():
    ref, ours = _params(), _params()
    torch_opt = _run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True), ref, steps=10)
    # Resume the torch run in shardwise, continue both; then hand shardwise's state back to torch.
    twin = [p.clone() for p in ref]
    sw = AdamW(twin, lr=1e-2, amsgrad=True, impl="fused")
    sw.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    for p, q in zip(ref, twin):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    torch_opt.step()
    sw.step()
    for p, q in zip(ref, twin):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    back = torch.optim.AdamW([p.clone() for p in twin], lr=1e-2, amsgrad=True)
    back.load_state_dict(copy.deepcopy(sw.state_dict()))
    assert set(back.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert float(back.state_dict()["state"][0]["step"]) == 11
    del ours


@pytest.mark.parametrize(("src", "dst"), list(itertools.permutations(IMPLS, 2)))
def test_state_dict_across_impls(src, dst):
    a, b = _params(), _params()
    opt_a = _run(lambda ps: AdamW(ps, variant="adabelief", amsgrad=True, impl=src), a, steps=5)
    opt_b = AdamW(b, variant="adabelief", amsgrad=True, impl=dst)
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    _run(lambda ps: opt_a, a, steps=5, seed=7)
    _run(lambda ps: opt_b, b, steps=5, seed=7)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=-1.0), "Invalid learning rate: -1.0"),
        (dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
        (dict(betas=(1.2, 0.999)), "Invalid beta parameter at index 0: 1.2"),
        (dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
        (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
        (dict(variant="adamax"), "Invalid variant: 'adamax'"),
        (dict(impl="cuda"), "Invalid impl: 'cuda'"),
        (dict(state_bits=4), "Invalid state_bits: 4"),
        (dict(variant="radam", amsgrad=True), "amsgrad=True with variant='radam'"),
    ],
)
def test_validation_names_argument_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AdamW([torch.zeros(3, requires_grad=True)], **kwargs)


def test_validation_in_param_groups():
    with pytest.raises(ValueError, match="Invalid learning rate: -0.5"):
        AdamW([{"params": [torch.zeros(2)], "lr": -0.5}])


def test_sparse_gradients_fail_clearly():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients.*SparseAdam"):
        AdamW(emb.parameters()).step()


def test_params_without_grad_are_untouched_and_stateless():
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = AdamW([a, b], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b, torch.ones(3)) and b not in opt.state
    assert (a < 1).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_skip_nonfinite_leaves_params_and_state(impl):
    p = torch.ones(64, 64, requires_grad=True)
    opt = AdamW([p], impl=impl, skip_nonfinite=True, state_bits=8)
    p.grad = torch.ones_like(p)
    opt.step()
    before = (p.detach().clone(), copy.deepcopy(opt.state_dict()))
    p.grad = torch.full_like(p, float("nan"))
    opt.step()
    p.grad[0, 0] = float("inf")
    opt.step()
    assert opt.skipped_steps == 2
    assert torch.equal(p, before[0])
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(v, before[1]["state"][0][k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skip_nonfinite_is_exact_for_huge_finite_gradients(dtype):
    """The check's fast 2-norm overflows on huge finite values: those steps must still be taken."""
    big, small = torch.zeros(8, 8, dtype=dtype, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = AdamW([big, small], lr=0.1, skip_nonfinite=True)
    big.grad = torch.full_like(big, 1e19)  # the sum of 64 squares overflows; Adam's own v does not
    small.grad = torch.ones_like(small)
    opt.step()
    assert opt.skipped_steps == 0 and bool((big < 0).all())
    small.grad[1] = float("-inf")  # one non-finite element in one tensor skips the whole step
    opt.step()
    assert opt.skipped_steps == 1


def test_closure_and_zero_grad():
    p = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = Adam([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    losses = [float(opt.step(closure)) for _ in range(50)]
    assert losses[-1] < 0.1 * losses[0]


def test_from_preset_and_overrides():
    p = [torch.zeros(2, requires_grad=True)]
    opt = AdamW.from_preset("llm", p, lr=1e-4)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"]) == (1e-4, (0.9, 0.95), 0.1)
    assert isinstance(Adam.from_preset("gan-generator", p), Adam)


@pytest.mark.parametrize("impl", ["auto", "fused"])
@pytest.mark.parametrize("state_bits", [32, 8])
def test_channels_last_params_are_served(impl, state_bits):
    # Strided parameters (channels-last convolutions) take the multi-tensor path, same numbers.
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(128, 64, 3, 3, generator=g)
    strided = dense.clone().to(memory_format=torch.channels_last)
    a = AdamW([strided], impl=impl, state_bits=state_bits)
    b = AdamW([dense], impl="foreach", state_bits=state_bits)
    for _ in range(3):
        grad = torch.randn(dense.shape, generator=g)
        dense.grad, strided.grad = grad, grad.to(memory_format=torch.channels_last)
        a.step()
        b.step()
    assert strided.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(strided, dense, rtol=0, atol=0)
