"""Schedule-Free AdamW (Defazio et al. 2024, "The Road Less Scheduled") from the maintained
`schedulefree` package (github.com/facebookresearch/schedule_free).

It replaces the lr schedule by interpolating between a fast iterate z and a uniform average x; the
model is evaluated at x. The trainer therefore calls `optimizer.eval()` before evaluation and before
writing a checkpoint (the saved weights are x) and `optimizer.train()` after. It warms up by itself
over `schedule.warmup_steps`, and the trainer refuses any schedule but `constant`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from optim.builder import BuildContext, OptimizerConfig, param_groups, per_param, register


@dataclass
class ScheduleFreeConfig(OptimizerConfig):
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    r: float = 0.0  # polynomial weighting power of the average
    weight_lr_power: float = 2.0  # weight of each iterate in the average: lr_max ** weight_lr_power


@register(
    "schedulefree_adamw", ScheduleFreeConfig, "schedulefree.AdamWScheduleFree", per_param(8),
    needs_constant_schedule=True,
)  # fmt: skip
def _schedulefree_adamw(model: nn.Module, cfg: ScheduleFreeConfig, ctx: BuildContext) -> torch.optim.Optimizer:
    from schedulefree import AdamWScheduleFree

    optimizer = AdamWScheduleFree(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
        warmup_steps=ctx.warmup_steps, r=cfg.r, weight_lr_power=cfg.weight_lr_power, foreach=True,
    )  # fmt: skip
    optimizer.train()
    return optimizer
