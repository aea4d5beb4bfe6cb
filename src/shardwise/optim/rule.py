"""The Adam-family update rule, written once.

Every optimizer in shardwise (Adam, AdamW, AMSGrad, RAdam, AdaBelief) is the same per-element update
with a few fields switched. With gradient ``g``, parameter ``p``, step ``t`` (1-based), learning rate
``lr``, betas ``(b1, b2)``, ``eps`` and weight decay ``wd``::

    g   <- -g                              if maximize
    g   <- g + wd * p                      coupled (L2) decay: Adam
    p   <- p * (1 - lr * wd)               decoupled decay: AdamW (Loshchilov & Hutter, 2019)
    m   <- b1 * m + (1 - b1) * g
    v   <- b2 * v + (1 - b2) * g^2                      variant adam / radam
    v   <- b2 * v + (1 - b2) * (g - m)^2 + eps          variant adabelief (Zhuang et al., 2020)
    u   <- max(u, v); use u in place of v  if amsgrad (Reddi et al., 2018)
    p   <- p - step_size * m / (sqrt(v) * denom_scale + denom_eps)

The per-step scalars make the variants one formula:

* adam, adabelief: ``step_size = lr / bc1``, ``denom_scale = 1 / sqrt(bc2)``, ``denom_eps = eps``,
  with ``bc1 = 1 - b1^t``, ``bc2 = 1 - b2^t`` (Kingma & Ba, 2015).
* radam (Liu et al., 2020), when the variance of the adaptive rate is tractable (``rho_t > 5``):
  ``step_size = lr * r_t * sqrt(bc2) / bc1``, ``denom_scale = 1``, ``denom_eps = eps``, where
  ``rho_inf = 2 / (1 - b2) - 1``, ``rho_t = rho_inf - 2 t b2^t / bc2`` and
  ``r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))``.
  Otherwise it is SGD with momentum: ``step_size = lr / bc1`` and the denominator is 1
  (``denom_scale = 0``, ``denom_eps = 1``).

These reproduce ``torch.optim.Adam`` / ``AdamW`` (amsgrad too) and ``torch.optim.RAdam`` exactly in
exact arithmetic, and AdaBelief as the authors' ``adabelief_pytorch`` package with ``rectify=False``
and ``fixed_decay=False`` (``eps`` is added into the stored ``s_t`` every step).

Kernels (``shardwise.optim.kernels``) implement this rule; nothing else in the package does maths on
optimizer state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

VARIANTS = ("adam", "radam", "adabelief")


@dataclass(frozen=True)
class Rule:
    """Which member of the family: fixed for a param group, chosen at construction."""

    variant: str = "adam"
    amsgrad: bool = False
    decoupled: bool = True
    maximize: bool = False

    @property
    def belief(self) -> bool:
        """AdaBelief tracks the variance of (g - m) and adds eps into the stored state."""
        return self.variant == "adabelief"


@dataclass(frozen=True)
class StepScalars:
    """Host-side numbers for one step of one bucket; computed once, shared by all its tensors."""

    beta1: float
    beta2: float
    lr: float
    weight_decay: float
    eps: float
    step_size: float
    denom_scale: float
    denom_eps: float
    #: Multiplier of the raw gradient before the rule: ``1 / scale`` when ``torch.amp.GradScaler``
    #: hands the optimizer scaled gradients (1.0 otherwise).
    grad_scale: float = 1.0

    @property
    def decay_factor(self) -> float:
        """Multiplier of decoupled weight decay, ``1 - lr * wd``."""
        return 1.0 - self.lr * self.weight_decay


def step_scalars(
    rule: Rule,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: float = 1.0,
) -> StepScalars:
    """Bias corrections and (for RAdam) rectification for 1-based ``step``."""
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    step_size, denom_scale, denom_eps = lr / bc1, 1.0 / math.sqrt(bc2), eps
    if rule.variant == "radam":
        rho_inf = 2.0 / (1.0 - beta2) - 1.0
        rho_t = rho_inf - 2.0 * step * beta2**step / bc2
        if rho_t > 5.0:
            rect = math.sqrt(
                (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
            )
            step_size, denom_scale = lr * rect * math.sqrt(bc2) / bc1, 1.0
        else:
            denom_scale, denom_eps = 0.0, 1.0
    return StepScalars(
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        step_size=step_size,
        denom_scale=denom_scale,
        denom_eps=denom_eps,
        grad_scale=grad_scale,
    )
