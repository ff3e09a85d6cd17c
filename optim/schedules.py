"""Learning-rate schedules as pure functions of the step, so that resuming at step N gives exactly the
lr an uninterrupted run has at step N. Each is a multiplicative factor on `optimizer.lr`, applied
through torch's LambdaLR, and each starts with a linear warmup over `schedule.warmup_steps`.

transformers' own functions are used where they define the curve (constant, cosine with a floor,
WSD, inverse square root); the others (linear with a floor, step, exponential) are written here,
and the tests check that `linear` with no floor equals transformers' linear schedule.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_inverse_sqrt_schedule,
    get_wsd_schedule,
)

from trainer.config import ScheduleConfig

LambdaLR = torch.optim.lr_scheduler.LambdaLR


def _warmup(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def linear_factor(step: int, *, warmup: int, max_steps: int, floor: float) -> float:
    """Warmup, then a straight line from 1 to `floor` at max_steps."""
    if step < warmup:
        return _warmup(step, warmup)
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return 1.0 - (1.0 - floor) * progress


def step_factor(step: int, *, warmup: int, step_size: int, gamma: float, floor: float) -> float:
    """Warmup, then multiply by gamma every step_size steps (never below `floor`)."""
    if step < warmup:
        return _warmup(step, warmup)
    return max(floor, gamma ** ((step - warmup) // step_size))


def exponential_factor(step: int, *, warmup: int, max_steps: int, floor: float) -> float:
    """Warmup, then a geometric decay from 1 that reaches `floor` exactly at max_steps."""
    if step < warmup:
        return _warmup(step, warmup)
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return floor**progress


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, max_steps: int) -> LambdaLR:
    warmup = min(cfg.warmup_steps, max_steps)
    floor = cfg.min_lr_ratio
    if cfg.name == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    if cfg.name == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, max_steps, min_lr_rate=floor)
    if cfg.name == "wsd":
        decay = round(max_steps * cfg.decay_fraction)
        return get_wsd_schedule(
            optimizer, num_warmup_steps=warmup, num_decay_steps=decay,
            num_stable_steps=max(0, max_steps - warmup - decay), decay_type=cfg.decay_type, min_lr_ratio=floor,
        )  # fmt: skip
    if cfg.name == "inverse_sqrt":
        return get_inverse_sqrt_schedule(optimizer, warmup, timescale=cfg.timescale)
    if cfg.name == "linear":
        fn = partial(linear_factor, warmup=warmup, max_steps=max_steps, floor=floor)
    elif cfg.name == "step":
        fn = partial(step_factor, warmup=warmup, step_size=cfg.step_size, gamma=cfg.gamma, floor=floor)
    elif cfg.name == "exponential":
        fn = partial(exponential_factor, warmup=warmup, max_steps=max_steps, floor=floor)  # validated > 0
    else:
        raise ValueError(f"unknown schedule {cfg.name!r}")
    return LambdaLR(optimizer, fn)


def _one(step: int) -> float:
    return 1.0


def constant_scheduler(optimizer: torch.optim.Optimizer) -> LambdaLR:
    """Factor 1 throughout: for optimizers that schedule themselves (schedule-free)."""
    return LambdaLR(optimizer, _one)


def lr_factor(scheduler: LambdaLR, step: int) -> float:
    """The schedule's factor at `step` (the lr of step `step` is optimizer.lr times this)."""
    return scheduler.lr_lambdas[0](step)


SCHEDULES = ("constant", "linear", "cosine", "wsd", "step", "exponential", "inverse_sqrt")
