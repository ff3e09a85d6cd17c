"""Learning-rate schedules as pure functions of the step, so that resuming at step N gives exactly the
lr an uninterrupted run has at step N. Each is a multiplicative factor on `optimizer.lr`, applied
through torch's LambdaLR, and each starts with a linear warmup over `schedule.warmup_steps`.

transformers' own functions are used where they define the curve (constant, cosine with a floor,
WSD, inverse square root); the others (linear with a floor, step, exponential) are written here,
and the tests check that `linear` with no floor equals transformers' linear schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from transformers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_inverse_sqrt_schedule,
    get_wsd_schedule,
)

LambdaLR = torch.optim.lr_scheduler.LambdaLR
DECAY_TYPES = ("linear", "cosine", "1-sqrt")


@dataclass
class ScheduleConfig:
    """The schema of configs/schedule/*.yaml (trainer/config.py stores it in Hydra's ConfigStore)."""

    name: str = "cosine"  # one of SCHEDULES
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # the lr floor, as a fraction of optimizer.lr
    decay_fraction: float = 0.2  # wsd: the share of max_steps spent decaying
    decay_type: str = "linear"  # wsd: linear | cosine | 1-sqrt
    step_size: int = 1000  # step: steps between decays
    gamma: float = 0.5  # step: the factor applied at each decay
    timescale: int | None = None  # inverse_sqrt: lr = peak * sqrt(timescale / (step + timescale - warmup))

    def validate(self) -> None:
        """ValueError naming the first bad value (trainer/config.py reports it as one line)."""
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule.name={self.name!r} is not one of {', '.join(SCHEDULES)}")
        if self.decay_type not in DECAY_TYPES:
            raise ValueError(f"schedule.decay_type={self.decay_type!r} is not one of {', '.join(DECAY_TYPES)}")
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"schedule.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"schedule.decay_fraction={self.decay_fraction} must be in [0, 1]")
        if self.step_size < 1 or not 0.0 < self.gamma <= 1.0:
            raise ValueError(
                f"schedule.step_size={self.step_size} must be >= 1 and schedule.gamma={self.gamma} in (0, 1]"
            )
        if self.timescale is not None and self.timescale < 1:
            raise ValueError(f"schedule.timescale={self.timescale} must be >= 1 (or null)")
        if self.name == "exponential" and self.min_lr_ratio <= 0:
            raise ValueError("schedule=exponential decays to schedule.min_lr_ratio, which must be > 0")


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


def _constant(optimizer, cfg: ScheduleConfig, warmup: int, max_steps: int) -> LambdaLR:
    return get_constant_schedule_with_warmup(optimizer, warmup)


def _cosine(optimizer, cfg: ScheduleConfig, warmup: int, max_steps: int) -> LambdaLR:
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, max_steps, min_lr_rate=cfg.min_lr_ratio)


def _wsd(optimizer, cfg: ScheduleConfig, warmup: int, max_steps: int) -> LambdaLR:
    decay = round(max_steps * cfg.decay_fraction)
    return get_wsd_schedule(
        optimizer, num_warmup_steps=warmup, num_decay_steps=decay,
        num_stable_steps=max(0, max_steps - warmup - decay), decay_type=cfg.decay_type,
        min_lr_ratio=cfg.min_lr_ratio,
    )  # fmt: skip


def _inverse_sqrt(optimizer, cfg: ScheduleConfig, warmup: int, max_steps: int) -> LambdaLR:
    return get_inverse_sqrt_schedule(optimizer, warmup, timescale=cfg.timescale)


def _linear(optimizer, cfg: ScheduleConfig, warmup: int, max_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, partial(linear_factor, warmup=warmup, max_steps=max_steps, floor=cfg.min_lr_ratio))


def _step(optimizer, cfg: ScheduleConfig, warmup: int, max_steps: int) -> LambdaLR:
    fn = partial(step_factor, warmup=warmup, step_size=cfg.step_size, gamma=cfg.gamma, floor=cfg.min_lr_ratio)
    return LambdaLR(optimizer, fn)


def _exponential(optimizer, cfg: ScheduleConfig, warmup: int, max_steps: int) -> LambdaLR:
    fn = partial(exponential_factor, warmup=warmup, max_steps=max_steps, floor=cfg.min_lr_ratio)  # validated > 0
    return LambdaLR(optimizer, fn)


# name -> builder: the one list of schedules (configs/schedule/<name>.yaml is tested against it)
BUILDERS = {
    "constant": _constant, "linear": _linear, "cosine": _cosine, "wsd": _wsd, "step": _step,
    "exponential": _exponential, "inverse_sqrt": _inverse_sqrt,
}  # fmt: skip
SCHEDULES = tuple(BUILDERS)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, max_steps: int) -> LambdaLR:
    return BUILDERS[cfg.name](optimizer, cfg, min(cfg.warmup_steps, max_steps), max_steps)


def _one(step: int) -> float:
    return 1.0


def constant_scheduler(optimizer: torch.optim.Optimizer) -> LambdaLR:
    """Factor 1 throughout: for optimizers that schedule themselves (schedule-free)."""
    return LambdaLR(optimizer, _one)


def lr_factor(scheduler: LambdaLR, step: int) -> float:
    """The schedule's factor at `step` (the lr of step `step` is optimizer.lr times this)."""
    return scheduler.lr_lambdas[0](step)
