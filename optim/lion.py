"""Lion: EvoLved Sign Momentum.

Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms" (arXiv:2302.06675), Algorithm 2.
For every parameter tensor, with gradient g, momentum m (zero at the start), learning rate lr and
weight decay wd:

    u = sign(beta1 * m + (1 - beta1) * g)      # interpolate, then take the sign
    p = p * (1 - lr * wd)                      # decoupled weight decay, as in AdamW
    p = p - lr * u
    m = beta2 * m + (1 - beta2) * g            # the momentum tracks g with the slower beta2

Reference code: `lion_pytorch.Lion` (lucidrains/lion-pytorch) with `use_triton=False` and
`decoupled_weight_decay=False`, which computes exactly these four lines per parameter. This file
computes the same maths with multi-tensor `torch._foreach_*` ops over all parameters of a param group
that share a device and dtype. Differences from the reference, none of which change the algorithm:

- the interpolations use `lerp` (one pass over memory instead of a multiply and an add), so m differs
  from the reference's in the last bits of floating point (the parameters, which move by whole signs,
  agree bit for bit in the test);
- the update direction is computed into one temporary list (the reference clones each momentum);
- hyperparameters are validated with ValueError (the reference asserts), lr = 0 is allowed, and a
  beta of exactly 1 is rejected (the momentum would never move).

State per parameter: `exp_avg` (the momentum m), a tensor like the parameter. No step counter: Lion
has no bias correction.

Cost: five foreach ops (lerp into a temporary, sign_, lerp_, mul_ for decay, add_), about 13 passes
over parameter-sized memory against the 7 of one fused AdamW kernel. The gradients are not modified.

Fused step (`fused=True`, optim/fused.py): `_lion_kernel`, the same four lines compiled into one loop
per tensor (reads p, g, m; writes p, m: 5 passes), bit-identical to the foreach step on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from optim import checks, fused
from optim._foreach import CheckedOptimizer
from optim.builder import VERIFIED, BuildContext, param_groups, per_param, register
from optim.stats import Reducer, StatsContext, local


class Lion(CheckedOptimizer):
    """Lion (Chen et al. 2023). See the module docstring for the update and its reference."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        fused: bool = False,
    ):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))
        self.fused = fused  # the compiled step (not a group value: a checkpoint resumes either way)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = self.closure_loss(closure)

        for group in self.param_groups:
            buckets: dict[tuple[torch.device, torch.dtype], tuple[list, list, list]] = {}
            for p in self.params_with_grad(group):
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                ps, gs, ms = buckets.setdefault((p.device, p.dtype), ([], [], []))
                ps.append(p)
                gs.append(p.grad)
                ms.append(state["exp_avg"])

            beta1, beta2 = group["betas"]
            hp = dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"])
            for ps, gs, ms in buckets.values():
                if self.fused:
                    _lion_fused(ps, gs, ms, **hp)
                else:
                    _lion_foreach(ps, gs, ms, **hp)
        return loss


def _lion_foreach(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    # u = beta1 * m + (1 - beta1) * g, then sign(u): the one temporary of the step.
    update = torch._foreach_lerp(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_sign_(update)
    # m = beta2 * m + (1 - beta2) * g (needs only the old m and g, so it can happen now).
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta2)
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, update, alpha=-lr)


def _lion_kernel(p, g, m, interp, momentum_interp, decay, step):
    """The foreach step above for one tensor, rounded as ATen rounds it (optim/fused.py)."""
    update = fused.lerp(m, g, interp).sign()
    m.copy_(fused.lerp(m, g, momentum_interp))
    p.copy_(fused.add_scaled(p * decay, update, step))


_LION = fused.Kernel(_lion_kernel)


def _lion_fused(params, grads, exp_avgs, *, lr: float, beta1: float, beta2: float, weight_decay: float) -> None:
    args = fused.scalars(1.0 - beta1, 1.0 - beta2, 1.0 - lr * weight_decay, -lr)
    fused.run(_LION, _lion_foreach, [params, grads, exp_avgs], args, lr=lr, beta1=beta1, beta2=beta2,
              weight_decay=weight_decay)  # fmt: skip


# ---- registration in the trainer's optimizer zoo ---------------------------------------------------


@dataclass
class LionConfig(fused.FusedConfig):
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])

    def validate(self) -> None:
        super().validate()
        checks.betas(self)


def lion_stats(ctx: StatsContext, out: Reducer) -> None:
    """Lion moves every coordinate by exactly lr (plus decay), so what matters is the direction.

    m_norm          ||m|| (exp_avg, the slow beta2 momentum) over all parameters.
    sign_agreement  fraction of coordinates whose update has the sign of -g (update * g < 0; a zero
                    gradient counts as disagreeing). Read from the parameter change, so decoupled weight
                    decay is included (it flips a sign only where wd * |p| > 1). 1: Lion follows this
                    gradient's signs; ~0.5: the momentum, not this gradient, sets the direction.
    flip_rate       fraction of coordinates whose update changed sign since the previous step (needs the
                    previous step's update: registered with stats_previous_update). Near 0: steady
                    directions; near 0.5: the update direction is noise (sign(m) jitters around 0), and
                    every step is a +-lr random walk, so lr may be too high for this batch size.
    """
    out.norm("m_norm", ctx.state("exp_avg")[1])
    where = [i for i, g in enumerate(ctx.grads) if g is not None]
    out.fraction("sign_agreement", [ctx.updates[i] * local(ctx.grads[i]) < 0 for i in where])
    if ctx.previous_updates is not None:
        out.fraction("flip_rate", [u * w < 0 for u, w in zip(ctx.updates, ctx.previous_updates, strict=True)])


@register(
    "lion", LionConfig, per_param(4), fsdp=VERIFIED, stats=lion_stats, stats_previous_update=True,
    search_space={"optimizer.lr": "tag(log, interval(3e-5, 3e-3))", "optimizer.weight_decay": "interval(0.0, 1.0)",
                  "optimizer.betas.0": "interval(0.85, 0.95)", "optimizer.betas.1": "interval(0.95, 0.999)"},
)  # fmt: skip
def _build(model: torch.nn.Module, cfg: LionConfig, ctx: BuildContext) -> Lion:
    groups = param_groups(model, cfg.weight_decay)
    return Lion(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused.resolve(cfg, model.parameters(), ctx, "lion"))
