"""Schedule-Free AdamW (Defazio et al. 2024, "The Road Less Scheduled") from the maintained
`schedulefree` package (github.com/facebookresearch/schedule_free).

It replaces the lr schedule by interpolating between a fast iterate z and a uniform average x; the
model is evaluated at x. Its spec declares train/eval modes, so the trainer evaluates, samples and
writes checkpoints inside `optim.builder.eval_mode` (the saved weights are x) and trains in train mode.
It warms up by itself over `schedule.warmup_steps`; any other schedule is ignored with a warning
(`schedules_itself`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from optim import checks
from optim.builder import VERIFIED, BuildContext, OptimizerConfig, param_groups, per_param, register
from optim.stats import Reducer, StatsContext, local


@dataclass
class ScheduleFreeConfig(OptimizerConfig):
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
    from schedulefree import AdamWScheduleFree

    optimizer = AdamWScheduleFree(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
        warmup_steps=ctx.warmup_steps, r=cfg.r, weight_lr_power=cfg.weight_lr_power, foreach=True,
    )  # fmt: skip
    optimizer.train()
    return optimizer
