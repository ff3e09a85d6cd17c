"""Optimizer registry and builder: config -> torch optimizer with decay / no-decay parameter groups.

Each optimizer registers an `OptimizerSpec` with `@register(...)` in its own module under optim/
(torch.optim-backed ones in optim/torch_optimizers.py): its typed config (a dataclass subclassing
`OptimizerConfig`, which Hydra checks `configs/optimizer/<name>.yaml` against), a build function,
where the code comes from, and the optimizer-state bytes the algorithm needs in theory. Modules are
discovered automatically, so adding an optimizer touches one Python file, one YAML and its tests.

Cross-cutting options handled here for every optimizer: Lookahead wrapping (`optimizer.lookahead.k`)
and linear lr scaling with the global batch (`optimizer.scale_lr`).
"""

from __future__ import annotations

import functools
import importlib
import logging
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class LookaheadConfig:
    k: int | None = None  # sync every k steps; null = no Lookahead
    alpha: float = 0.5  # slow-weight step size


@dataclass
class OptimizerConfig:
    """Fields every optimizer has; each optimizer's config subclasses this."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    lookahead: LookaheadConfig = field(default_factory=LookaheadConfig)
    scale_lr: bool = False  # lr x global_batch / reference_batch
    reference_batch: int = 32  # sequences per optimizer step that `lr` was tuned for


@dataclass
class BuildContext:
    device: torch.device
    global_batch: int = 1  # sequences per optimizer step (micro x accum x world)
    tokens_per_step: int = 1
    warmup_steps: int = 0  # schedule.warmup_steps, for optimizers that warm up themselves


@dataclass
class OptimizerSpec:
    name: str
    config: type  # dataclass subclassing OptimizerConfig
    build: Callable[[nn.Module, Any, BuildContext], torch.optim.Optimizer]
    source: str  # "torch.optim.AdamW", "ours (optim/lion.py)", ...
    state_bytes: Callable[[nn.Module, Any], float]  # theoretical optimizer-state bytes for this model
    # Optional per-step hook factory: (model, optimizer, cfg, HookContext) -> hook(step)
    hook: Callable | None = None
    needs_constant_schedule: bool = False  # the optimizer replaces the lr schedule
    # The family's statistics, logged under opt/ every trainer.stats_interval steps: fn(StatsContext,
    # Reducer) (optim/stats.py). stats_previous_update: the statistics compare with the previous step's update.
    stats: Callable | None = None
    stats_previous_update: bool = False


@dataclass
class HookContext:
    """What an optimizer's per-step hook may use: the upcoming training batches and the loop's settings."""

    # upcoming(n): the next n training micro-batches, without consuming them (so an optimizer's hook
    # never changes which data the model trains on)
    upcoming: Callable[[int], list[tuple[torch.Tensor, torch.Tensor]]]
    autocast: Any  # the forward pass's autocast context
    n_micro: int = 1  # micro-batches per optimizer step
    grad_clip: float = 0.0


REGISTRY: dict[str, OptimizerSpec] = {}


def register(name: str, config: type, source: str, state_bytes: Callable, **extra) -> Callable:
    def decorator(build: Callable) -> Callable:
        REGISTRY[name] = OptimizerSpec(name, config, build, source, state_bytes, **extra)
        return build

    return decorator


def load_all() -> dict[str, OptimizerSpec]:
    """Import every module of the optim package so that each registers its optimizers."""
    package = importlib.import_module("optim")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"optim.{module.name}")
    return REGISTRY


# ---- helpers shared by the build functions ---------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float, params: list[nn.Parameter] | None = None) -> list[dict]:
    """Decay matrices and embeddings (dim >= 2); never biases or LayerNorm gains (dim < 2).

    Tied parameters appear once: named_parameters() de-duplicates them.
    """
    chosen = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in chosen if p.dim() >= 2]
    no_decay = [p for p in chosen if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def numel(model: nn.Module, predicate: Callable[[nn.Parameter], bool] = lambda p: True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad and predicate(p))


def per_param(nbytes: float) -> Callable[[nn.Module, Any], float]:
    """Theory for optimizers that keep `nbytes` of state per parameter."""
    return lambda model, cfg: nbytes * numel(model)


# ---- validation --------------------------------------------------------------------------------------

# field name -> (check, what it must be); applied to whichever fields an optimizer's config has
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "eps": (lambda v: v > 0, "> 0"),
    "eps2": (lambda v: v > 0, "> 0"),
    "betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1), e.g. [0.9,0.95]"),
    "adamw_betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "adamw_lr": (lambda v: v > 0, "> 0"),
    "adamw_eps": (lambda v: v > 0, "> 0"),
    "adamw_weight_decay": (lambda v: v >= 0, ">= 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "dampening": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "alpha": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "rho": (lambda v: v > 0, "> 0"),
    "hessian_interval": (lambda v: v >= 1, ">= 1"),
    "ns_steps": (lambda v: v >= 1, ">= 1"),
    "block_size": (lambda v: v >= 2 and (v & (v - 1)) == 0, "a power of two >= 2"),
    "min_8bit_size": (lambda v: v >= 0, ">= 0"),
    "reference_batch": (lambda v: v >= 1, ">= 1"),
    "lr_decay": (lambda v: v >= 0, ">= 0"),
    "initial_accumulator_value": (lambda v: v >= 0, ">= 0"),
    "d": (lambda v: v > 0, "> 0"),
    "beta2_decay": (lambda v: v <= 0, "<= 0"),
    "r": (lambda v: v >= 0, ">= 0"),
    "adjust_lr_fn": (lambda v: v in ("original", "match_rms_adamw"), "null, original or match_rms_adamw"),
}


def optimizer_errors(cfg: OptimizerConfig) -> str | None:
    """The first invalid hyperparameter as one line, or None."""
    if cfg.name not in load_all():
        return f"optimizer.name={cfg.name!r} is not one of {', '.join(sorted(REGISTRY))}"
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in _CHECKS and value is not None and not _CHECKS[f.name][0](value):
            shown = list(value) if isinstance(value, (list, tuple)) else value
            return f"optimizer.{f.name}={shown} must be {_CHECKS[f.name][1]}"
    la = cfg.lookahead
    if la.k is not None and la.k < 1:
        return f"optimizer.lookahead.k={la.k} must be >= 1 (null turns Lookahead off)"
    if not 0 < la.alpha <= 1:
        return f"optimizer.lookahead.alpha={la.alpha} must be in (0, 1]"
    return None


# ---- the builder -------------------------------------------------------------------------------------


def scaled(cfg: OptimizerConfig, global_batch: int) -> OptimizerConfig:
    """Linear lr scaling (Goyal et al. 2017): lr x global_batch / reference_batch, when enabled."""
    if not cfg.scale_lr or global_batch == cfg.reference_batch:
        return cfg
    factor = global_batch / cfg.reference_batch
    changes = {"lr": cfg.lr * factor}
    if hasattr(cfg, "adamw_lr"):
        changes["adamw_lr"] = cfg.adamw_lr * factor
    log.info("lr scaling: global batch %d / reference %d -> optimizer.lr %.3g -> %.3g",
             global_batch, cfg.reference_batch, cfg.lr, changes["lr"])  # fmt: skip
    return replace(cfg, **changes)


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, ctx: BuildContext) -> torch.optim.Optimizer:
    spec = load_all()[cfg.name]
    optimizer = spec.build(model, scaled(cfg, ctx.global_batch), ctx)
    if cfg.lookahead.k is not None:
        from optim.lookahead import Lookahead

        optimizer = Lookahead(optimizer, k=cfg.lookahead.k, alpha=cfg.lookahead.alpha)
    return optimizer


def build_hook(model, optimizer, cfg: OptimizerConfig, ctx: HookContext) -> Callable[[int], None] | None:
    """The optimizer's per-step hook (e.g. Sophia's Hessian refresh), called after every step, or None."""
    spec = load_all()[cfg.name]
    return spec.hook(model, optimizer, cfg, ctx) if spec.hook else None


def state_bytes_theory(model: nn.Module, cfg: OptimizerConfig) -> float:
    spec = load_all()[cfg.name]
    extra = 4 * numel(model) if cfg.lookahead.k is not None else 0  # Lookahead's slow weights (fp32)
    return spec.state_bytes(model, cfg) + extra


def state_bytes_measured(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state dict (nested optimizers included), on this rank: of a
    sharded (FSDP) state, this rank's shards."""

    def walk(obj) -> int:
        if torch.is_tensor(obj):
            local = obj.to_local() if hasattr(obj, "to_local") else obj  # a DTensor: this rank's shard
            return local.numel() * local.element_size()
        if isinstance(obj, dict):
            return sum(walk(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v) for v in obj)
        return 0

    state = optimizer.state_dict()
    return walk({k: v for k, v in state.items() if k != "param_groups"})


def family_stats(cfg: OptimizerConfig) -> tuple[Callable | None, bool]:
    """The statistics function of the configured optimizer (optim/stats.py) and whether it compares with
    the previous step's update. With Lookahead: the inner optimizer's statistics plus the fast/slow distance
    (optim/lookahead.py:lookahead_stats)."""
    spec = load_all()[cfg.name]
    if cfg.lookahead.k is None:
        return spec.stats, spec.stats_previous_update
    from optim.lookahead import lookahead_stats

    return functools.partial(lookahead_stats, inner=spec.stats), spec.stats_previous_update
