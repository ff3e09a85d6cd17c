"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner.

Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam" (arXiv:2409.11321), Algorithm 3,
from the maintained `pytorch_optimizer.SOAP` (checked against the authors' code, github.com/nikhilvyas/SOAP,
in tests/test_optim_soap.py). For a matrix parameter W with gradient G:

    L = b_s L + (1 - b_s) G G^T,   R = b_s R + (1 - b_s) G^T G       # Shampoo's Kronecker factors
    G' = Q_L^T G Q_R                                                  # the gradient in their eigenbasis
    m = b1 m + (1 - b1) G            (kept in the original basis)
    v = b2 v + (1 - b2) G'^2         (kept in the eigenbasis)
    W = W - lr sqrt(1 - b2^t) / (1 - b1^t) * Q_L ((Q_L^T m Q_R) / (sqrt(v) + eps)) Q_R^T
    W = W (1 - lr wd)                                                 # decoupled weight decay

Every `precondition_frequency` steps Q_L, Q_R are refreshed by one power iteration and a QR (the first
eigenbasis comes from an eigendecomposition); the columns of v follow the re-sorted eigenvectors. The first
step only initialises L, R and Q (the paper's: the projection never uses the gradient it projects), so the
weights first move on step 2. b_s = `shampoo_beta` (null: b2). A dimension above `max_precondition_dim`
is left unrotated (identity); vectors (biases, norm gains) take plain Adam unless `precondition_1d`.

State per parameter: m and v (parameter-sized) and, per preconditioned dimension d, L or R and its Q
(d x d each), all float32 here.

The basis refresh runs its QR in float32 (as the authors' code does); where L or R is rank-deficient
(small models, small batches) the step in their null directions is dominated by rounding, so two
float32 runs that differ only in summation order drift ~1e-3 apart after a refresh.
pytorch_optimizer initialises a parameter's state on the group's first step only: a parameter whose
gradient first appears later is not given the paper's initialise-only step (noticed, left alone; every
MiniGPT parameter has a gradient on step 1).

Under FSDP it is refused: L, R and their eigenbases are statistics of whole matrices, and each rank holds
a shard. Under DDP every rank computes the same step on the averaged gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from optim import checks
from optim.builder import BuildContext, OptimizerConfig, param_groups, refused, register
from optim.stats import Reducer, StatsContext, local


@dataclass
class SOAPConfig(OptimizerConfig):
    betas: list[float] = field(default_factory=lambda: [0.95, 0.95])
    shampoo_beta: float | None = None  # EMA of L and R; null: betas[1]
    eps: float = 1e-8
    precondition_frequency: int = 10  # steps between eigenbasis refreshes
    max_precondition_dim: int = 10000  # larger dimensions are not rotated
    merge_dims: bool = False  # merge small dimensions of >2-D tensors before preconditioning
    precondition_1d: bool = False  # rotate vectors too (a d x d factor per vector)
    correct_bias: bool = True
    normalize_gradient: bool = False

    def validate(self) -> None:
        super().validate()
        checks.betas(self)
        checks.below_one(self, "shampoo_beta")
        checks.positive(self, "eps")
        checks.require(self, "precondition_frequency", lambda v: v >= 1, ">= 1")
        checks.require(self, "max_precondition_dim", lambda v: v >= 1, ">= 1")


def _factor_dims(p: nn.Parameter, cfg: SOAPConfig) -> list[int]:
    """The sizes of the d x d factors SOAP keeps for this parameter (as pytorch_optimizer.SOAP builds them)."""
    if p.dim() == 1:
        return [p.numel()] if cfg.precondition_1d and p.numel() <= cfg.max_precondition_dim else []
    shape = list(p.shape)
    if cfg.merge_dims:
        from pytorch_optimizer.optimizer.utils.shape import merge_small_dims

        shape = merge_small_dims(p.shape, cfg.max_precondition_dim)
    return [d for d in shape if d <= cfg.max_precondition_dim]


def _state_bytes(model: nn.Module, cfg: SOAPConfig) -> float:
    """m and v (4 bytes each per element), and per preconditioned dimension d a factor and its eigenbasis."""
    params = [p for p in model.parameters() if p.requires_grad]
    return sum(8 * p.numel() + sum(2 * 4 * d * d for d in _factor_dims(p, cfg)) for p in params)


def soap_stats(ctx: StatsContext, out: Reducer) -> None:
    """SOAP: Adam's moments, with v in the rotated basis, and the spectrum of Shampoo's factors.

    m_norm, v_norm     ||m|| (exp_avg, original basis) and ||v|| (exp_avg_sq, eigenbasis) over all parameters.
    v/min|median|max   spread of v: the second moment of the gradient in the eigenbasis of L and R. Rotating
                       concentrates the gradient's energy, so v spreads wider than Adam's on the same model.
    step_size/min|median|max  the per-coordinate multiplier of the rotated momentum in the step, as the step
                       used it: lr sqrt(1 - b2^t) / (1 - b1^t) / (sqrt(v) + eps), t = the Adam steps taken.
    factor_eig/min|median|max  spread of the estimated eigenvalues diag(Q^T L Q) of every Kronecker factor
                       (L and R of every matrix) in its current eigenbasis. A wide spread: the gradients are
                       strongly anisotropic, which is where rotating helps most. Absent before step 2.
    """
    params, ms = ctx.state("exp_avg")
    vs = ctx.state("exp_avg_sq")[1]
    out.norm("m_norm", ms)
    out.norm("v_norm", vs)
    out.spread("v", vs)

    def step_size(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        group = ctx.group_of(p)
        (beta1, beta2), t, lr = group["betas"], group["step"] - 1, group["lr"]
        if group["correct_bias"] and t > 0:
            lr = lr * (1 - beta2**t) ** 0.5 / (1 - beta1**t)
        return lr / (local(v).sqrt() + group["eps"])

    out.spread("step_size", (step_size(p, v) for p, v in zip(params, vs, strict=True)))
    factors = [
        (gg, q)
        for p in params
        for gg, q in zip(ctx.optimizer.state[p]["GG"], ctx.optimizer.state[p]["Q"] or [], strict=False)
        if len(gg) > 0 and len(q) > 0
    ]
    if factors:
        out.spread("factor_eig", ((q * (gg @ q)).sum(dim=0) for gg, q in factors))


@register(
    "soap", SOAPConfig, _state_bytes, stats=soap_stats,
    fsdp=refused("SOAP's preconditioners are eigenbases of whole-matrix statistics, and FSDP gives each rank a shard"),
    search_space={"optimizer.lr": "tag(log, interval(3e-4, 3e-2))", "optimizer.weight_decay": "interval(0.0, 0.3)",
                  "optimizer.betas.0": "interval(0.9, 0.98)", "optimizer.betas.1": "interval(0.9, 0.99)"},
)  # fmt: skip
def _build(model: nn.Module, cfg: SOAPConfig, ctx: BuildContext) -> torch.optim.Optimizer:
    from pytorch_optimizer import SOAP

    return SOAP(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), shampoo_beta=cfg.shampoo_beta,
        eps=cfg.eps, precondition_frequency=cfg.precondition_frequency,
        max_precondition_dim=cfg.max_precondition_dim, merge_dims=cfg.merge_dims,
        precondition_1d=cfg.precondition_1d, correct_bias=cfg.correct_bias,
        normalize_gradient=cfg.normalize_gradient,
    )  # fmt: skip
