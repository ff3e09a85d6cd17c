"""AdaBelief: adapting step sizes by the belief in observed gradients.

Zhuang et al. 2020, "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients"
(NeurIPS 2020, arXiv:2010.07468), Algorithm 2 with decoupled weight decay. For every parameter tensor,
with gradient g, step t = 1, 2, ..., learning rate lr, weight decay wd:

    p = p * (1 - lr * wd)                                   # decoupled weight decay (AdamW style)
    m = beta1 * m + (1 - beta1) * g
    s = beta2 * s + (1 - beta2) * (g - m)^2 + eps           # the "belief": variance of g around m
    p = p - lr / (1 - beta1^t) * m / (sqrt(s) / sqrt(1 - beta2^t) + eps)

No rectification (RAdam-style) and no AMSGrad-style max. Note that eps enters twice, as in the
paper's Algorithm 2 and the authors' code: added to s every step (so it is part of the state), and
added to the bias-corrected sqrt in the denominator.

Reference code: `pytorch_optimizer.AdaBelief` (kozistr/pytorch_optimizer, 4.1.0) with
`weight_decouple=True, fixed_decay=False, rectify=False, ams_bound=False` (the authors'
adabelief-pytorch 0.2 computes the same with `weight_decouple=True, rectify=False, amsgrad=False`).
This file computes the same maths with multi-tensor `torch._foreach_*` ops over the parameters of a
param group that share a device, dtype and step. The only difference is that the bias corrections
are folded into scalars, which changes rounding in the last bits:

    p = p - (lr * sqrt(1 - beta2^t) / (1 - beta1^t)) * m / (sqrt(s) + eps * sqrt(1 - beta2^t))

State per parameter: `step` (a float32 CPU scalar tensor, as in torch.optim.Adam), `exp_avg` (m) and
`exp_avg_var` (s), tensors like the parameter.

Cost: nine foreach ops and two temporary lists alive one at a time (g - m, then the denominator),
about 25 passes over parameter-sized memory against the 7 of one fused AdamW kernel. The gradients are
not modified. Every op has a DTensor rule, so it runs on FSDP2's sharded parameters unchanged.

Fused step (`fused=True`, optim/fused.py): `_adabelief_kernel`, the same ops compiled into one loop per
tensor (reads p, g, m, s; writes p, m, s: 7 passes, as fused AdamW), bit-identical to the foreach step on
a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from optim import checks, fused
from optim._foreach import CheckedOptimizer
from optim.builder import VERIFIED, BuildContext, param_groups, per_param, register
from optim.stats import Reducer, StatsContext
from optim.torch_optimizers import adam_moment_stats


class AdaBelief(CheckedOptimizer):
    """AdaBelief (Zhuang et al. 2020). See the module docstring for the update and its reference."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: float = 0.0,
        *,
        fused: bool = False,
    ):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.fused = fused  # the compiled step (not a group value: a checkpoint resumes either way)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = self.closure_loss(closure)

        for group in self.param_groups:
            params, steps = [], []
            for p in self.params_with_grad(group):
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_var"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                steps.append(state["step"])
            if not params:
                continue
            torch._foreach_add_(steps, 1.0)

            buckets: dict[tuple[torch.device, torch.dtype, float], tuple[list, list, list, list]] = {}
            for p, step in zip(params, steps, strict=True):
                state = self.state[p]
                ps, gs, ms, ss = buckets.setdefault((p.device, p.dtype, step.item()), ([], [], [], []))
                ps.append(p)
                gs.append(p.grad)
                ms.append(state["exp_avg"])
                ss.append(state["exp_avg_var"])

            beta1, beta2 = group["betas"]
            update = _adabelief_fused if self.fused else _adabelief_foreach
            for (_, _, step), (ps, gs, ms, ss) in buckets.items():
                update(
                    ps, gs, ms, ss, step=step, lr=group["lr"], beta1=beta1, beta2=beta2,
                    eps=group["eps"], weight_decay=group["weight_decay"],
                )  # fmt: skip
        return loss


def _adabelief_foreach(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_vars: list[torch.Tensor],
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)

    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)

    # s = beta2 * s + (1 - beta2) * (g - m)^2 + eps, through one temporary list.
    tmp = torch._foreach_sub(grads, exp_avgs)
    torch._foreach_mul_(exp_avg_vars, beta2)
    torch._foreach_addcmul_(exp_avg_vars, tmp, tmp, value=1.0 - beta2)
    torch._foreach_add_(exp_avg_vars, eps)

    # Denominator sqrt(s) + eps * sqrt(bc2), in a new list once the first temporary is freed. (Not
    # _foreach_copy_ into it and sqrt in place: DTensor, FSDP2's parameters, has no rule for that op.)
    del tmp
    denom = torch._foreach_sqrt(exp_avg_vars)
    torch._foreach_add_(denom, eps * bias_correction2_sqrt)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr * bias_correction2_sqrt / bias_correction1)


def _adabelief_kernel(p, g, m, s, decay, interp, beta2, one_minus_beta2, eps, denom_eps, step):
    """The foreach step above for one tensor, rounded as ATen rounds it (optim/fused.py)."""
    p_decayed = p * decay
    m_new = fused.lerp(m, g, interp)
    diff = g - m_new
    s_new = fused.addcmul(s * beta2, diff, diff, one_minus_beta2) + eps
    m.copy_(m_new)
    s.copy_(s_new)
    p.copy_(fused.addcdiv(p_decayed, m_new, s_new.sqrt() + denom_eps, step))


_ADABELIEF = fused.Kernel(_adabelief_kernel)


def _adabelief_fused(params, grads, exp_avgs, exp_avg_vars, *, step: float, lr: float, beta1: float, beta2: float,
                     eps: float, weight_decay: float) -> None:  # fmt: skip
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    args = fused.scalars(1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2, eps, eps * bias_correction2_sqrt,
                         -lr * bias_correction2_sqrt / (1.0 - beta1**step))  # fmt: skip
    hp = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    fused.run(_ADABELIEF, _adabelief_foreach, [params, grads, exp_avgs, exp_avg_vars], args, **hp)


# ---- registration in the trainer's optimizer zoo ---------------------------------------------------


@dataclass
class AdaBeliefConfig(fused.FusedConfig):
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-16

    def validate(self) -> None:
        super().validate()
        checks.betas(self)
        checks.positive(self, "eps")


def adabelief_stats(ctx: StatsContext, out: Reducer) -> None:
    """AdaBelief: Adam's statistics with the belief s (exp_avg_var, the EMA of (g - m)^2 + eps) in v's place.

    m_norm, s_norm        ||m|| and ||s|| over all parameters.
    s/min|median|max      spread of s over coordinates. Small s: the gradient agrees with its prediction
                          m, so AdaBelief takes a large step there (unlike Adam, whose v counts g^2 whatever
                          its direction); large s: the gradient deviates from m, so the step is small.
    step_size/min|median|max  the per-coordinate multiplier of m in the update, as the step computes it:
                          lr / (1 - beta1^t) / (sqrt(s) / sqrt(1 - beta2^t) + eps). Its max is bounded by
                          s >= eps: a median close to the max means s has collapsed to its floor.
    """
    params, ms = ctx.state("exp_avg")
    adam_moment_stats(ctx, out, params, ms, ctx.state("exp_avg_var")[1], v_name="s")


@register(
    "adabelief", AdaBeliefConfig, per_param(8), fsdp=VERIFIED, stats=adabelief_stats,
    search_space={"optimizer.lr": "tag(log, interval(1e-4, 1e-2))", "optimizer.weight_decay": "interval(0.0, 0.3)",
                  "optimizer.betas.0": "interval(0.8, 0.95)", "optimizer.betas.1": "interval(0.9, 0.999)"},
)  # fmt: skip
def _build(model: torch.nn.Module, cfg: AdaBeliefConfig, ctx: BuildContext) -> AdaBelief:
    return AdaBelief(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
        fused=fused.resolve(cfg, model.parameters(), ctx, "adabelief"),
    )  # fmt: skip
