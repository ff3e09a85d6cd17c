"""Schedule-Free AdamW (Defazio et al. 2024, "The Road Less Scheduled") from the maintained
`schedulefree` package (github.com/facebookresearch/schedule_free).

It replaces the lr schedule by interpolating between a fast iterate z and a uniform average x; the
model is evaluated at x. Its spec declares train/eval modes, so the trainer evaluates, samples and
writes checkpoints inside `optim.builder.eval_mode` (the saved weights are x) and trains in train mode.
It warms up by itself over `schedule.warmup_steps`; any other schedule is ignored with a warning
(`schedules_itself`).

Fused step (`optimizer.fused`, optim/fused.py): the package's step is one long list of foreach ops and
cannot be fused from outside, so `FusedAdamWScheduleFree` is the package's class with its step written
again: the same per-group bookkeeping (warmup, lr_max, weight_sum, ckp1, k), then `_schedulefree_kernel`,
the package's foreach ops for one tensor compiled into one loop (reads y, g, z, v; writes y, z, v: 7
passes), in the same order and with ATen's rounding. Unlike the package it leaves .grad alone (the package
divides it in place). It equals the package's step up to the square root: torch's eager CPU sqrt is not
correctly rounded (1 ulp off on ~0.7% of elements) and the compiled one is, so the weights differ by a
few float32 ulps (tests/test_fused_optimizers.py: within 1e-6 after 20 steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from schedulefree import AdamWScheduleFree
from torch import nn

from optim import checks, fused
from optim.builder import VERIFIED, BuildContext, param_groups, per_param, register
from optim.stats import Reducer, StatsContext, local


class FusedAdamWScheduleFree(AdamWScheduleFree):
    """schedulefree.AdamWScheduleFree with a compiled step (module docstring); eval(), train() and the
    state are the package's."""

    @torch.no_grad()
    def step(self, closure=None):
        if not self.param_groups[0]["train_mode"]:
            raise Exception("Optimizer was not in train mode when step is called. Please insert .train() and "
                            ".eval() calls on the optimizer. See documentation for details.")  # fmt: skip
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # The package's bookkeeping, in its order (schedulefree/adamw_schedulefree.py, step()).
            beta1, beta2 = group["betas"]
            k, warmup_steps = group["k"], group["warmup_steps"]
            sched = (k + 1) / warmup_steps if k < warmup_steps else 1.0
            bias_correction2 = 1 - beta2 ** (k + 1)
            lr = group["lr"] * sched
            group["scheduled_lr"] = lr
            lr_max = group["lr_max"] = max(lr, group["lr_max"])
            weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
            weight_sum = group["weight_sum"] = group["weight_sum"] + weight
            ckp1 = weight / weight_sum if weight_sum != 0 else 0
            active = [p for p in group["params"] if p.grad is not None]
            for p in active:
                if "z" not in self.state[p]:
                    self.state[p]["z"] = torch.clone(p, memory_format=torch.preserve_format)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            lists = [active, [p.grad for p in active], [self.state[p]["z"] for p in active],
                     [self.state[p]["exp_avg_sq"] for p in active]]  # fmt: skip
            args = fused.scalars(beta2, 1 - beta2, bias_correction2, group["eps"], group["weight_decay"], ckp1,
                                 lr * (beta1 * (1 - ckp1) - 1), -lr)  # fmt: skip
            fused.run(_SCHEDULEFREE, _schedulefree_eager, lists, args, values=args)
            group["k"] = k + 1
        return loss


def _schedulefree_kernel(y, g, z, v, beta2, one_minus_beta2, bias_correction2, eps, decay, ckp1, y_step, z_step):
    """The package's foreach ops for one tensor, rounded as ATen rounds them (optim/fused.py)."""
    v_new = fused.addcmul(v * beta2, g, g, one_minus_beta2)
    v.copy_(v_new)
    normalised = fused.add_scaled(g / ((v_new / bias_correction2).sqrt() + eps), y, decay)
    y.copy_(fused.add_scaled(fused.lerp(y, z, ckp1), normalised, y_step))
    z.copy_(fused.add_scaled(z, normalised, z_step))


_SCHEDULEFREE = fused.Kernel(_schedulefree_kernel)


def _schedulefree_eager(ys, gs, zs, vs, *, values) -> None:
    """Tensors the compiled kernel does not take: the same function, uncompiled (fma in two roundings)."""
    for item in zip(ys, gs, zs, vs, strict=True):
        _schedulefree_kernel(*(fused.local(t) for t in item), *values)


@dataclass
class ScheduleFreeConfig(fused.FusedConfig):
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    r: float = 0.0  # polynomial weighting power of the average
    weight_lr_power: float = 2.0  # weight of each iterate in the average: lr_max ** weight_lr_power

    def validate(self) -> None:
        super().validate()
        checks.betas(self)
        checks.positive(self, "eps")
        checks.non_negative(self, "r")


def schedulefree_stats(ctx: StatsContext, out: Reducer) -> None:
    """Schedule-free AdamW in train mode: the model's parameters are y, the optimizer keeps z (the fast,
    SGD-like iterate) and v; the evaluated average x = y + (1 - 1/beta1) (z - y) lies on the same line.

    yz_gap             ||y - z|| over all parameters: how far the fast iterate has run ahead of the point
                       where gradients are taken. It grows with lr and shrinks as the average catches up;
                       a gap that keeps growing while the loss stalls suggests lr is too high.
    yz_gap_rel         yz_gap / ||y||.
    v/min|median|max   spread of v (exp_avg_sq) over coordinates.
    step_size/min|median|max  the per-coordinate multiplier of g in z's step: scheduled lr (warmup
                       included) / (sqrt(v / (1 - beta2^k)) + eps).
    """
    params, zs = ctx.state("z")
    vs = ctx.state("exp_avg_sq")[1]
    out.norm("yz_gap", (local(p).float() - local(z).float() for p, z in zip(params, zs, strict=True)))
    out.sum_of("_sq/y", params, lambda x: x * x)
    out.derive("yz_gap_rel", lambda v: v["yz_gap"] / v["_sq/y"] ** 0.5 if v["_sq/y"] > 0 else float("nan"))
    out.spread("v", vs)

    def step_size(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        group = ctx.group_of(p)  # group["k"] counts the steps taken, this one included
        denom = (local(v) / (1 - group["betas"][1] ** group["k"])).sqrt() + group["eps"]
        return group["scheduled_lr"] / denom

    out.spread("step_size", (step_size(p, v) for p, v in zip(params, vs, strict=True)))


@register(
    "schedulefree_adamw", ScheduleFreeConfig, per_param(8), fsdp=VERIFIED, stats=schedulefree_stats,
    schedules_itself=True, train_eval_modes=True,
    search_space={"optimizer.lr": "tag(log, interval(3e-4, 3e-2))", "optimizer.weight_decay": "interval(0.0, 0.3)",
                  "optimizer.betas.0": "interval(0.85, 0.95)", "optimizer.betas.1": "interval(0.99, 0.9999)"},
)  # fmt: skip
def _schedulefree_adamw(model: nn.Module, cfg: ScheduleFreeConfig, ctx: BuildContext) -> torch.optim.Optimizer:
    compiled = fused.resolve(cfg, model.parameters(), ctx, "schedulefree_adamw")
    optimizer = (FusedAdamWScheduleFree if compiled else AdamWScheduleFree)(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
        warmup_steps=ctx.warmup_steps, r=cfg.r, weight_lr_power=cfg.weight_lr_power, foreach=True,
    )  # fmt: skip
    optimizer.train()
    return optimizer
