"""kernels/compiled.py, the torch.compile path that serves impl="fused" off CPU (CUDA).

The same code compiles for CPU with Inductor, so it is checked here against the reference
implementation on a machine without a GPU: 32- and 8-bit state, coupled and decoupled decay,
AMSGrad, AdaBelief, maximize, and a row that ends in a partial 8-bit block.
"""

from __future__ import annotations

import pytest
import torch

from shardwise.optim import quant
from shardwise.optim.kernels import Bucket, compiled, run, step_with
from shardwise.optim.rule import Rule, step_scalars

pytestmark = pytest.mark.slow  # each rule compiles once (~15 s on 2 cores)

RULES = [
    Rule(variant="adam", amsgrad=True, decoupled=True),  # AdamW + AMSGrad
    Rule(variant="adabelief", amsgrad=False, decoupled=False, maximize=True),  # Adam-style decay
]
SHAPE = (40, 300)  # rows of one whole 256-block and one partial block


def _bucket(params: list[torch.Tensor], bits: int) -> Bucket:
    grads = [torch.zeros_like(p) for p in params]
    if bits == 32:
        zeros = lambda: [torch.zeros_like(p) for p in params]
        return Bucket(params, grads, zeros(), zeros(), zeros())
    codes = lambda dtype: [torch.zeros(p.shape, dtype=dtype) for p in params]
    scales = lambda: [torch.zeros(quant.scales_shape(p.shape)) for p in params]
    return Bucket(
        params, grads, codes(torch.int8), codes(torch.uint8), codes(torch.uint8), scales(), scales(), scales()
    )


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("rule", RULES, ids=["adamw_amsgrad", "adam_adabelief_maximize"])
def test_compiled_path_matches_reference_and_compiles_once(rule, bits):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    g = torch.Generator().manual_seed(0)
    start = torch.randn(SHAPE, generator=g)
    ours, ref = _bucket([start.clone()], bits), _bucket([start.clone()], bits)
    for step in range(1, 11):
        grad = torch.randn(SHAPE, generator=g)
        ours.grads[0].copy_(grad)
        ref.grads[0].copy_(grad)
        scalars = step_scalars(rule, step, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
        step_with(compiled, ours, rule=rule, scalars=scalars)
        run("reference", ref, rule=rule, scalars=scalars)
    # The per-step scalars are tensor inputs: ten steps with changing bias corrections, one graph.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    if bits == 32:
        torch.testing.assert_close(ours.params[0], ref.params[0], rtol=0, atol=2e-6)
        torch.testing.assert_close(ours.exp_avg_sqs[0], ref.exp_avg_sqs[0], rtol=1e-5, atol=1e-9)
        return
    torch.testing.assert_close(ours.params[0], ref.params[0], rtol=0, atol=1e-3)  # a flipped code
    states = [("exp_avgs", "exp_avg_absmax"), ("exp_avg_sqs", "exp_avg_sq_absmax")]
    if rule.amsgrad:
        states.append(("max_exp_avg_sqs", "max_exp_avg_sq_absmax"))
    for codes, scales in states:
        diff = (getattr(ours, codes)[0].int() - getattr(ref, codes)[0].int()).abs()
        assert diff.max() <= 1 and (diff == 0).float().mean() > 0.999, codes
        torch.testing.assert_close(getattr(ours, scales)[0], getattr(ref, scales)[0], rtol=1e-4, atol=0)


def test_availability_is_reported():
    assert compiled.available(torch.device("cpu"))
    if not compiled.available(torch.device("cuda")):
        assert "Triton" in compiled.why_unavailable(torch.device("cuda"))
