"""Learning-rate schedules as functions of the step (transformers' implementations), so that resuming
at step N gives exactly the lr an uninterrupted run has at step N.

All are multiplicative factors on `optimizer.lr`, applied through torch's LambdaLR.
"""

from __future__ import annotations

import torch
from transformers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_wsd_schedule,
)

from trainer.config import ScheduleConfig


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = min(cfg.warmup_steps, max_steps)
    if cfg.name == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    if cfg.name == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, max_steps, min_lr_rate=cfg.min_lr_ratio)
    if cfg.name == "wsd":
        decay = round(max_steps * cfg.decay_fraction)
        return get_wsd_schedule(
            optimizer,
            num_warmup_steps=warmup,
            num_decay_steps=decay,
            num_stable_steps=max(0, max_steps - warmup - decay),
            decay_type=cfg.decay_type,
            min_lr_ratio=cfg.min_lr_ratio,
        )
    raise ValueError(f"unknown schedule {cfg.name!r}")


def lr_factor(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> float:
    """The schedule's factor at `step` (the lr of step `step` is optimizer.lr times this)."""
    return scheduler.lr_lambdas[0](step)
