"""On resume, the optimizer hyperparameters of this run's config apply, not the checkpoint's.

Loading an optimizer's state dict also restores its param-group values (lr, betas, weight decay, ...),
and the scheduler restores its peak lrs, so a changed `optimizer.lr` would be silently ignored. Here the
checkpoint's optimizer config (from its config.yaml) is compared with this run's: each changed field is
logged in one line, and every param-group value that the change moves is set again (the lr as the
schedule's new peak, from the current step on). A checkpoint of another optimizer, or with Lookahead
switched on or off, holds state of another shape: that is refused in one line.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from optim.builder import BuildContext, OptimizerConfig, build_optimizer, load_all
from trainer.errors import ConfigError

log = logging.getLogger(__name__)


def saved_optimizer_config(ckpt: Path) -> OptimizerConfig:
    """The optimizer config the checkpoint was trained with."""
    try:
        saved = OmegaConf.load(ckpt / "config.yaml").optimizer
        spec = load_all().get(saved.name)
        if spec is None:
            raise ConfigError(f"checkpoint {ckpt} was trained with optimizer={saved.name}, which this trainer lacks")
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(spec.config), saved))
    except (OSError, OmegaConfBaseException) as e:
        raise ConfigError(f"checkpoint {ckpt}: its config.yaml cannot be read ({type(e).__name__})") from None


def check_same_optimizer(saved: OptimizerConfig, cfg: OptimizerConfig, ckpt: Path) -> None:
    if saved.name != cfg.name or (saved.lookahead.k is None) != (cfg.lookahead.k is None):
        what = lambda c: c.name + ("" if c.lookahead.k is None else " with Lookahead")  # noqa: E731
        k = saved.lookahead.k
        fix = f"optimizer={saved.name}" + ("" if k is None else f" optimizer.lookahead.k={k}")
        raise ConfigError(
            f"checkpoint {ckpt} holds {what(saved)} state; this run asks for {what(cfg)}: resume with {fix}, "
            f"or start a new run"
        )


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    return a == b


def apply_changed_hyperparameters(
    optimizer: torch.optim.Optimizer, scheduler, model: torch.nn.Module, saved: OptimizerConfig,
    cfg: OptimizerConfig, ctx: BuildContext,
) -> list[str]:  # fmt: skip
    """After the optimizer and scheduler state are loaded: set again what this run's config changes, and the lr
    of this run's schedule at the restored step. Returns the changed field names (each also logged)."""
    changed = [f.name for f in fields(cfg) if getattr(saved, f.name) != getattr(cfg, f.name)]
    if not changed:
        lr_from_schedule(optimizer, scheduler)
        return []
    for name in changed:
        log.info("resume: optimizer.%s %s -> %s (this run's value applies)", name, getattr(saved, name),
                 getattr(cfg, name))  # fmt: skip
    # What each changed field does to the param groups: two fresh optimizers (no state) tell.
    before, after = build_optimizer(model, saved, ctx).param_groups, build_optimizer(model, cfg, ctx).param_groups
    for i, (group, old, new) in enumerate(zip(optimizer.param_groups, before, after, strict=True)):
        for key, value in new.items():
            if key == "params" or _same(old.get(key), value):
                continue
            if key == "lr":  # the schedule's new peak
                scheduler.base_lrs[i] = value
                group["initial_lr"] = value
            else:
                group[key] = value
    lr_from_schedule(optimizer, scheduler)
    return changed


def lr_from_schedule(optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Each group's lr from this run's schedule at the restored step. LambdaLR computes it only at its next
    step(), so without this the first resumed step would run at the checkpoint's lr even when schedule.* or
    trainer.max_steps changed. With nothing changed it is the same arithmetic, so the same lr to the bit."""
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)


def log_changed_schedule(ckpt: Path, schedule, max_steps: int) -> None:
    """One line per schedule.* value (and trainer.max_steps, which shapes the schedule) that differs from the
    checkpoint's: this run's schedule applies from the resumed step."""
    try:
        saved = OmegaConf.load(ckpt / "config.yaml")
    except (OSError, OmegaConfBaseException):
        return  # saved_optimizer_config has already refused an unreadable config.yaml
    pairs = [(f"schedule.{f.name}", saved.get("schedule", {}).get(f.name), getattr(schedule, f.name))
             for f in fields(schedule)]  # fmt: skip
    pairs.append(("trainer.max_steps", saved.get("trainer", {}).get("max_steps"), max_steps))
    for name, old, new in pairs:
        if old is not None and old != new:
            log.info("resume: %s %s -> %s (this run's schedule applies from the resumed step)", name, old, new)
