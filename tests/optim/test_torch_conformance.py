"""PyTorch's own Adam / AdamW optimizer checks, run against shardwise for every impl.

Driven by the OptimizerInfo entries that ship in the torch wheel
(``torch.testing._internal.common_optimizers.optim_db``: ``optim_inputs_func`` for the constructor
configurations, ``optim_error_inputs_func`` for the invalid ones), with each ``torch.optim`` class
swapped for its shardwise twin (``Adam`` -> ``shardwise.optim.Adam``, ``AdamW`` -> ``AdamW``) and
run once per ``impl``. torch's ``test/test_optim.py`` (class ``TestOptimRenewed``) is not in the
wheel: the checks below re-create its CPU tests that apply to Adam/AdamW, by the same names, in
pytest form, and nothing is downloaded at test time.

Out of scope, with the reason (the matching torch tests are not re-created):

* CUDA / XPU / MPS only: ``capturable`` configs (the OptimizerInfo returns them only for GPU
  devices), ``test_fused_cpu_matches_cuda``, ``test_peak_memory_foreach``,
  ``test_foreach_large_tensor``, ``test_fused_large_tensor``, ``test_mixed_device_dtype``,
  ``test_forloop_goes_right_direction_multigpu``, ``test_cpu_load_state_dict``,
  ``test_state_dict_with_cuda_params``.
* ``differentiable=True`` (``test_differentiable_*``, ``gradcheck`` through the step): shardwise
  steps under ``no_grad`` and raises ``NotImplementedError``, checked below.
* ``test_defaults_changed_to_foreach``: mocks torch's private default-selection helper, which
  shardwise does not use (its ``impl="auto"`` rule is tested in test_adam.py).
* Sparse gradients (``test_rosenbrock_sparse``): Adam's OptimizerInfo has ``supports_sparse=False``
  too; shardwise raises pointing to ``SparseAdam`` (test_adam.py).
* Torch-compile variants (``TEST_WITH_TORCHDYNAMO`` decorators): not how this suite runs.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch.testing._internal.common_optimizers import (  # needs expecttest (dev extra)
    OptimizerErrorEnum,
    optim_db,
)

import shardwise.optim as sw

IMPLS = ["reference", "foreach", "fused"]
INFOS = {info.optim_cls.__name__: info for info in optim_db if info.optim_cls.__name__ in ("Adam", "AdamW")}
TWIN = {"Adam": sw.Adam, "AdamW": sw.AdamW}


def _cases(dtype=None):
    """(class name, shardwise class, OptimizerInput) for every CPU config torch lists."""
    for name, info in INFOS.items():
        for inp in info.optim_inputs_func("cpu", dtype):
            yield pytest.param(name, TWIN[name], inp, id=f"{name}-{inp.desc.replace(' ', '_')}")


CASES = list(_cases())


def _model(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(10, 5, generator=g, dtype=dtype))
    bias = torch.nn.Parameter(torch.randn(10, generator=g, dtype=dtype))
    data = torch.randn(5, generator=g, dtype=dtype)
    return weight, bias, data


def _closure(opt, weight, bias, data):
    def closure():
        opt.zero_grad()
        loss = (weight.mv(data) + bias).pow(2).sum()
        loss.backward()
        return loss

    return closure


def _train(opt, params, steps, seed=5):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()


def _assert_same(a, b, where="sd"):
    """Equal state dicts: tensors bit-equal, everything else ==."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


# ------------------------------------------------------------------------------------ TestOptimRenewed
def test_optim_infos_cover_adam_and_adamw():
    assert set(INFOS) == {"Adam", "AdamW"}
    for info in INFOS.values():
        assert {"foreach", "fused"} <= set(info.supported_impls) and info.supports_complex


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_errors(name):
    """Every CPU error input raises (or warns) as torch.optim does, with torch's message."""
    for err in INFOS[name].optim_error_inputs_func("cpu", torch.float32):
        inp = err.optimizer_error_input
        params = inp.params if inp.params is not None else [torch.nn.Parameter(torch.randn(2, 3))]
        assert err.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR, inp.desc
        if issubclass(err.error_type, Warning):
            with pytest.warns(err.error_type, match=err.error_regex):
                TWIN[name](params, **inp.kwargs)
        else:
            with pytest.raises(err.error_type, match=err.error_regex):
                TWIN[name](params, **inp.kwargs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("name", "cls", "inp"), CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forloop_goes_right_direction(name, cls, inp, impl, dtype):
    weight, bias, data = _model(dtype)
    opt = cls([weight, bias], impl=impl, **inp.kwargs)
    closure = _closure(opt, weight, bias, data)
    initial = closure().item()
    for _ in range(5):
        opt.step(closure)
    if inp.kwargs.get("maximize", False):
        assert closure().item() > initial
    else:
        assert closure().item() < initial


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("name", "cls", "inp"), CASES)
def test_param_group_with_lrscheduler_goes_right_direction(name, cls, inp, impl):
    for schedulers in INFOS[name].scheduler_inputs:
        weight, bias, data = _model()
        opt = cls([{"params": [weight]}, {"params": [bias], "lr": 0.01}], impl=impl, **inp.kwargs)
        scheds = [make(opt) for make in schedulers]
        closure = _closure(opt, weight, bias, data)
        initial = closure().item()
        for _ in range(20):
            loss = opt.step(closure)
            for s in scheds:
                s.step(loss) if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau) else s.step()
        final = closure().item()
        assert final > initial if inp.kwargs.get("maximize", False) else final < initial


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize(("name", "cls", "inp"), CASES)
def test_tensor_lr(name, cls, inp, impl):
    """A 1-element tensor lr gives the float lr's results (torch: not with foreach, not capturable)."""
    a, b = _model(torch.float64), _model(torch.float64)
    kwargs = {**inp.kwargs, "lr": inp.kwargs.get("lr", 1e-3)}
    opt_a = cls(a[:2], impl=impl, **kwargs)
    opt_b = cls(b[:2], impl=impl, **{**kwargs, "lr": torch.tensor(kwargs["lr"])})
    _train(opt_a, a[:2], 4)
    _train(opt_b, b[:2], 4)
    for p, q in zip(a[:2], b[:2]):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("name", "cls", "inp"), CASES)
def test_complex(name, cls, inp, impl):
    """A complex parameter steps as its view_as_real twin (torch's test_complex)."""
    g = torch.Generator().manual_seed(0)
    complex_param = torch.randn(5, 5, dtype=torch.complex64, generator=g, requires_grad=True)
    real_param = torch.view_as_real(complex_param).detach().clone().requires_grad_()
    complex_opt = cls([complex_param], impl=impl, **inp.kwargs)
    real_opt = cls([real_param], impl=impl, **inp.kwargs)
    for _ in range(3):
        complex_param.grad = torch.randn(5, 5, dtype=torch.complex64, generator=g)
        real_param.grad = torch.view_as_real(complex_param.grad).clone()
        complex_opt.step()
        real_opt.step()
        torch.testing.assert_close(torch.view_as_real(complex_param), real_param)
    # State is torch.optim's: complex moments (so complex state dicts interchange too).
    assert complex_opt.state[complex_param]["exp_avg"].dtype == torch.complex64


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("name", "cls", "inp"), CASES)
def test_complex_2d(name, cls, inp, impl):
    """Rosenbrock on a complex 2-vector against its real and imaginary parts as two parameters."""

    def rosenbrock(t):
        x, y = t
        return (1 - x) ** 2 + 100 * (y - x**2) ** 2

    a1 = torch.randn(2, dtype=torch.complex64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    re, im = a1.real.detach().clone().requires_grad_(), a1.imag.detach().clone().requires_grad_()
    opt1 = cls([a1], impl=impl, **inp.kwargs)
    opt2 = cls([re, im], impl=impl, **inp.kwargs)
    for _ in range(10):
        opt1.zero_grad()
        opt2.zero_grad()
        rosenbrock(a1).abs().backward()
        rosenbrock(torch.complex(re, im)).abs().backward()
        torch.testing.assert_close(a1.grad.real, re.grad)
        torch.testing.assert_close(a1.grad.imag, im.grad)
        opt1.step()
        opt2.step()
        torch.testing.assert_close(a1.real, re)
        torch.testing.assert_close(a1.imag, im)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("name", "cls", "inp"), CASES)
def test_step_is_noop_when_params_have_no_grad(name, cls, inp, impl):
    params = [torch.randn(2, 3, requires_grad=True) for _ in range(2)]
    before = [p.detach().clone() for p in params]
    opt = cls(params, impl=impl, **inp.kwargs)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before)) and not opt.state


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("name", "cls", "inp"), CASES)
def test_step_is_noop_for_zero_grads(name, cls, inp, impl):
    kwargs = {**inp.kwargs, "weight_decay": 0.0}  # torch's test zeroes weight decay as well
    param = torch.randn(5, 1, requires_grad=True)
    before = param.detach().clone()
    opt = cls([param], impl=impl, **kwargs)
    param.grad = torch.zeros_like(param)
    for _ in range(3):
        opt.step()
    assert torch.equal(param, before)


@pytest.mark.parametrize(("name", "cls", "inp"), CASES)
def test_optimizer_can_be_printed(name, cls, inp):
    opt = cls([torch.nn.Parameter(torch.randn(2, 3))], **inp.kwargs)
    text = repr(opt)
    assert text.startswith(f"{name} (") and "Parameter Group 0" in text and "impl=" in text


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("name", "cls", "inp"), CASES)
def test_state_dict_deterministic(name, cls, inp, impl):
    weight, bias, data = _model(torch.float64)
    opt = cls([weight, bias], impl=impl, **inp.kwargs)
    closure = _closure(opt, weight, bias, data)
    for _ in range(5):
        opt.step(closure)
    weight_c = torch.nn.Parameter(weight.detach().clone())
    bias_c = torch.nn.Parameter(bias.detach().clone())
    opt_c = cls([weight_c, bias_c], impl=impl, **inp.kwargs)
    closure_c = _closure(opt_c, weight_c, bias_c, data)
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(5):
        opt.step(closure)
        opt_c.step(closure_c)
        assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
    _assert_same(opt.state_dict(), opt_c.state_dict())
    # Repeated parameters have identical representations (torch issue 36831).
    opt_c.param_groups.extend(opt_c.param_groups)
    _assert_same(opt.state_dict()["param_groups"][-1], opt_c.state_dict()["param_groups"][-1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("name", "cls", "inp"), CASES)
def test_can_load_older_state_dict(name, cls, inp, impl):
    """State dicts from before a flag existed (torch's not_og_supported_flags), and from shardwise
    before it carried torch's keys, load and step."""
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    opt = cls(params, impl=impl, **inp.kwargs)
    _train(opt, params, 2)
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        for flag in (*INFOS[name].not_og_supported_flags, "decoupled_weight_decay", "variant"):
            group.pop(flag, None)
    for s in sd["state"].values():
        s["step"] = s["step"].item()  # very old state dicts: a Python number
    older = cls([torch.nn.Parameter(p.detach().clone()) for p in params], impl=impl, **inp.kwargs)
    older.load_state_dict(sd)
    group = older.param_groups[0]
    assert group["foreach"] is None and group["fused"] is None and group["capturable"] is False
    assert group["decoupled_weight_decay"] is (name == "AdamW")
    _train(older, older.param_groups[0]["params"], 1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("name", "cls", "inp"), CASES)
def test_save_load_equality_with_weights_only(name, cls, inp, impl):
    a = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64)) for _ in range(2)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt = cls(a, impl=impl, **inp.kwargs)
    _train(opt, a, 3)
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    twin = cls(b, impl=impl, **inp.kwargs)
    twin.load_state_dict(loaded)
    _train(opt, a, 3, seed=9)
    _train(twin, b, 3, seed=9)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("name", "cls", "inp"), CASES)
def test_deepcopy_copies_all_public_attrs(name, cls, inp, impl):
    params = [torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(8))]
    opt = cls(params, impl=impl, state_bits=8, skip_nonfinite=True, **inp.kwargs)
    _train(opt, params, 2)
    public = lambda o: {k for k in o.__dict__ if not k.startswith("_")}
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert public(twin) == public(opt)
        assert (twin.impl, twin.state_bits, twin.skip_nonfinite, twin.skipped_steps) == (
            opt.impl,
            opt.state_bits,
            opt.skip_nonfinite,
            opt.skipped_steps,
        )
    # A deep copy owns copies of the parameters: it steps exactly as the original.
    copied = copy.deepcopy({"params": params, "opt": opt})
    _train(opt, params, 3, seed=11)
    _train(copied["opt"], copied["params"], 3, seed=11)
    for p, q in zip(params, copied["params"]):
        assert torch.equal(p, q)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_param_groups_weight_decay_and_lr(name, impl):
    weight, bias, data = _model()
    opt = TWIN[name]([{"params": [weight], "weight_decay": 0.1}, {"params": [bias], "lr": 0.01}], impl=impl)
    closure = _closure(opt, weight, bias, data)
    initial = closure().item()
    for _ in range(20):
        opt.step(closure)
    assert closure().item() < initial


@pytest.mark.parametrize("impl", IMPLS)
def test_step_all_hooks(impl):
    calls = []
    param = torch.nn.Parameter(torch.randn(3))
    opt = sw.AdamW([param], impl=impl)
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre"))
    param.grad = torch.ones(3)
    try:
        opt.step()
    finally:
        handle.remove()
    assert calls == ["global pre", "pre", "post"]


def test_state_dict_and_load_state_dict_hooks():
    param = torch.nn.Parameter(torch.randn(3))
    opt = sw.Adam([param])
    opt.register_state_dict_post_hook(lambda o, sd: sd.__setitem__("extra", 1) or sd)
    seen = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append(sd.pop("extra", None)) or sd)
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    assert seen == [1]


@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize(("name", "cls", "inp"), CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_foreach_and_fused_match_forloop(name, cls, inp, impl, dtype):
    """torch's test_foreach_matches_forloop / test_fused_matches_forloop (CPU), with its
    tolerances for 16-bit dtypes (the fused kernel computes in fp32 and rounds once)."""
    kwargs = dict(inp.kwargs)
    if dtype == torch.float16:
        kwargs["eps"] = 0.1  # as optim_inputs_func does for fp16: 1e-8 is 0 in half precision
    runs = {}
    for which in ("reference", impl):
        params = [p.to(dtype) for p in _model(torch.float64)[:2]]
        params = [torch.nn.Parameter(p.detach()) for p in params]
        opt = cls(params, impl=which, **kwargs)
        _train(opt, params, 5)
        runs[which] = (params, opt.state_dict())
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 5e-3}[dtype]
    if dtype in (torch.bfloat16, torch.float16) and impl == "fused":
        tol = 2e-2  # one fp32 rounding vs torch's per-op rounding in the parameter dtype
    for p, q in zip(runs["reference"][0], runs[impl][0]):
        torch.testing.assert_close(p.double(), q.double(), rtol=tol, atol=tol)
    ref_state, state = runs["reference"][1]["state"], runs[impl][1]["state"]
    for pid in ref_state:
        assert ref_state[pid].keys() == state[pid].keys()
        assert float(ref_state[pid]["step"]) == float(state[pid]["step"]) == 5


@pytest.mark.parametrize(("name", "cls", "inp"), CASES)
def test_fused_does_not_step_if_foundinf(name, cls, inp):
    """GradScaler's protocol: with found_inf set, neither parameters nor state nor step move."""
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2)]
    opt = cls(params, fused=True, **inp.kwargs)
    assert opt._step_supports_amp_scaling
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    opt.grad_scale = torch.ones(())
    opt.found_inf = torch.ones(())
    opt.step()
    del opt.grad_scale, opt.found_inf
    assert all(torch.equal(p, q) for p, q in zip(params, before)) and not opt.state


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("name", "cls", "inp"), CASES)
def test_non_empty_state(name, cls, inp, impl):
    params = [torch.nn.Parameter(torch.randn(2, 3)) for _ in range(3)]
    opt = cls(params, impl=impl, **inp.kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(opt.state[p] for p in params)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("name", "cls", "inp"), CASES)
def test_grads_are_never_inplaced_into(name, cls, inp, impl):
    params = [torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = cls(params, impl=impl, **inp.kwargs)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        grads = [p.grad.clone() for p in params]
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


@pytest.mark.parametrize("impl", IMPLS)
def test_set_default_dtype_works_with_foreach(impl):
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        params = [torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float32))]
        opt = sw.AdamW(params, impl=impl)
        _train(opt, params, 2)
        assert opt.state[params[0]]["step"].dtype == torch.float64  # as torch: default-dtype scalar
        assert params[0].dtype == torch.float32
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("impl", IMPLS)
def test_can_load_from_to_named_state_dict(impl):
    """Named parameters (torch >= 2.6): ``param_names`` travel in the state dict."""
    model = torch.nn.Linear(3, 2)
    opt = sw.AdamW(list(model.named_parameters()), impl=impl)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == ["weight", "bias"]
    twin = sw.AdamW(list(copy.deepcopy(model).named_parameters()), impl=impl)
    twin.load_state_dict(sd)
    torch_twin = torch.optim.AdamW(list(copy.deepcopy(model).named_parameters()))
    torch_twin.load_state_dict(copy.deepcopy(sd))


# ------------------------------------------------------------------------------------ torch's flags
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_signature_is_torchs_then_ours(name):
    import inspect

    ours = list(inspect.signature(TWIN[name].__init__).parameters.values())
    theirs = list(inspect.signature(getattr(torch.optim, name).__init__).parameters.values())
    head = ours[: len(theirs)]
    assert [(p.name, p.kind, p.default) for p in head] == [(p.name, p.kind, p.default) for p in theirs]
    assert [p.name for p in ours[len(theirs) :]] == [
        "variant",
        "impl",
        "state_bits",
        "shard",
        "skip_nonfinite",
    ]


@pytest.mark.parametrize(
    ("kwargs", "impl"),
    [
        (dict(fused=True), "fused"),
        (dict(foreach=True), "foreach"),
        (dict(foreach=False, fused=False), "reference"),
        (dict(foreach=False), "reference"),
        (dict(fused=False), "foreach"),
        (dict(fused=True, impl="fused"), "fused"),
        (dict(foreach=False, impl="fused"), "fused"),
        (dict(fused=False, impl="reference"), "reference"),
    ],
)
def test_torch_flags_map_to_impl(kwargs, impl):
    opt = sw.AdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)
    assert opt.impl == impl
    assert opt.param_groups[0]["fused"] is kwargs.get("fused")  # recorded as given, like torch


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(impl="reference", fused=True), ValueError, "impl='reference' with fused=True"),
        (dict(impl="fused", foreach=True), ValueError, "impl='fused' with foreach=True"),
        (dict(impl="foreach", foreach=False), ValueError, "impl='foreach' with foreach=False"),
        (dict(impl="fused", fused=False), ValueError, "impl='fused' with fused=False"),
        (dict(fused=True, foreach=True), RuntimeError, "cannot be `True` together"),
        (dict(capturable=True), NotImplementedError, "capturable=True"),
        (dict(differentiable=True), NotImplementedError, "differentiable=True"),
    ],
)
def test_conflicts_and_unsupported_flags_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        sw.AdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize("impl", IMPLS)
def test_adam_decoupled_weight_decay_is_adamw(impl):
    """torch.optim.Adam(decoupled_weight_decay=True) is AdamW; so is shardwise's."""
    a = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))]
    b = [torch.nn.Parameter(a[0].detach().clone())]
    c = [torch.nn.Parameter(a[0].detach().clone())]
    _train(sw.Adam(a, weight_decay=0.1, decoupled_weight_decay=True, impl=impl), a, 5)
    _train(sw.AdamW(b, weight_decay=0.1, impl=impl), b, 5)
    _train(torch.optim.Adam(c, weight_decay=0.1, decoupled_weight_decay=True), c, 5)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[0], c[0], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("sw.AdamW", "torch.Adam"),
        ("torch.AdamW", "sw.Adam"),
        ("sw.Adam", "torch.AdamW"),
        ("torch.Adam", "sw.AdamW"),
    ],
)
def test_adam_adamw_interchange_keeps_weight_decay_semantics(src, dst, impl):
    """A state dict carries ``decoupled_weight_decay``: torch.optim.Adam loading an AdamW state dict
    continues as AdamW (and vice versa Adam stays Adam, unless loaded into an AdamW class, which
    is always decoupled), exactly as between torch's own classes."""
    make = {
        "sw.AdamW": lambda ps: sw.AdamW(ps, weight_decay=0.1, impl=impl),
        "sw.Adam": lambda ps: sw.Adam(ps, weight_decay=0.1, impl=impl),
        "torch.AdamW": lambda ps: torch.optim.AdamW(ps, weight_decay=0.1),
        "torch.Adam": lambda ps: torch.optim.Adam(ps, weight_decay=0.1),
    }
    twin_of = {
        "sw.AdamW": "torch.AdamW",
        "sw.Adam": "torch.Adam",
        "torch.AdamW": "sw.AdamW",
        "torch.Adam": "sw.Adam",
    }
    a = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))]
    opt = make[src](a)
    _train(opt, a, 3)
    b = [torch.nn.Parameter(a[0].detach().clone())]
    loaded = make[dst](b)
    loaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    decoupled = dst.endswith("AdamW") or src.endswith("AdamW")
    assert loaded.param_groups[0]["decoupled_weight_decay"] is decoupled
    # Continue: the loaded optimizer steps as its twin (torch <-> shardwise) loaded from the same dict.
    _train(loaded, b, 3, seed=8)
    c = [torch.nn.Parameter(a[0].detach().clone())]
    ref = make[twin_of[dst]](c)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(ref, c, 3, seed=8)
    torch.testing.assert_close(b[0], c[0], rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------------------------ GradScaler
@pytest.mark.parametrize("state_bits", [32, 8])
def test_grad_scaler_uses_fused_amp_scaling(state_bits):
    """torch.amp.GradScaler on CPU hands the fused step its scale instead of unscaling the grads in
    place; results match the unscale path (torch.optim.AdamW), inf steps are skipped by both."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 80, generator=g)
    ours, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = sw.AdamW([ours], lr=1e-2, fused=True, state_bits=state_bits)
    ref = (
        torch.optim.AdamW([theirs], lr=1e-2)
        if state_bits == 32
        else sw.AdamW([theirs], lr=1e-2, impl="foreach", state_bits=8)
    )
    scalers = [
        torch.amp.GradScaler("cpu", init_scale=2.0**10),
        torch.amp.GradScaler("cpu", init_scale=2.0**10),
    ]
    x = torch.randn(80, 8, generator=g)
    for step in range(6):
        for p, o, scaler in ((ours, opt, scalers[0]), (theirs, ref, scalers[1])):
            o.zero_grad()
            loss = (p @ x).square().mean() * (float("inf") if step == 3 else 1.0)
            scaler.scale(loss).backward()
            scaled = p.grad.clone()
            scaler.step(o)
            scaler.update()
            if o is opt and step != 3:
                assert torch.equal(p.grad, scaled)  # not unscaled in place: the kernel did it
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert float(opt.state[ours]["step"]) == 5  # the inf step was skipped
    assert not hasattr(opt, "grad_scale")  # GradScaler removed its attributes after the step


def test_grad_scale_is_declared_only_for_fused():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert sw.AdamW(p, impl="fused")._step_supports_amp_scaling
    for impl in ("auto", "foreach", "reference"):
        assert not getattr(sw.AdamW(p, impl=impl), "_step_supports_amp_scaling", False)


def test_complex_params_keep_32bit_state_with_8bit():
    """8-bit state: complex parameters stay 32-bit (complex moments, as torch.optim stores them)."""
    z = torch.nn.Parameter(torch.randn(128, 64, dtype=torch.complex64))
    r = torch.nn.Parameter(torch.randn(128, 64))
    opt = sw.AdamW([z, r], state_bits=8)
    z.grad, r.grad = torch.randn_like(z), torch.randn_like(r)
    opt.step()
    assert opt.state[z]["exp_avg"].dtype == torch.complex64 and "exp_avg_absmax" not in opt.state[z]
    assert opt.state[r]["exp_avg"].dtype == torch.int8
