"""Optimizer registry and builder: config -> torch optimizer with decay / no-decay parameter groups.

Each optimizer registers one `OptimizerSpec` with `@register(...)` in its own module under optim/
(torch.optim-backed ones in optim/torch_optimizers.py). The spec is the single source of truth for the
optimizer: its typed config (a dataclass subclassing `OptimizerConfig`, whose `validate()` holds its
checks and which Hydra checks `configs/optimizer/<name>.yaml` against), the build function, the
optimizer-state bytes the algorithm needs in theory, the Optuna search space of `+sweep=lr_search`, the
FSDP verdict, the statistics family, and the behaviours shared code must know about (a per-step hook,
an lr schedule of its own, train/eval modes, extra lr fields). The comparison presets, the FSDP lists
and the statistics doc are checked against this registry by tests. Modules are discovered
automatically, so adding an optimizer touches one Python file, one YAML and its tests.

Cross-cutting options handled here for every optimizer: Lookahead wrapping (`optimizer.lookahead.k`)
and linear lr scaling with the global batch (`optimizer.scale_lr`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from optim import checks

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

    def validate(self) -> None:
        """ValueError("optimizer.<field>=<value> must be ...") for the first bad value; each optimizer's
        config extends this with its own fields (calling super().validate() first)."""
        for f in fields(self):  # inf or nan passes every ordering check below, then trains to NaN
            value = getattr(self, f.name)
            items = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in items):
                raise ValueError(f"optimizer.{f.name}={value} must be finite")
        checks.positive(self, "lr")
        checks.non_negative(self, "weight_decay")
        checks.require(self, "reference_batch", lambda v: v >= 1, ">= 1")
        k, alpha = self.lookahead.k, self.lookahead.alpha
        if k is not None and k < 1:
            raise ValueError(f"optimizer.lookahead.k={k} must be >= 1 (null turns Lookahead off)")
        if not 0 < alpha <= 1:
            raise ValueError(f"optimizer.lookahead.alpha={alpha} must be in (0, 1]")


@dataclass
class BuildContext:
    device: torch.device
    global_batch: int = 1  # sequences per optimizer step (micro x accum x world)
    tokens_per_step: int = 1
    warmup_steps: int = 0  # schedule.warmup_steps, for optimizers that warm up themselves
    max_steps: int | None = None  # trainer.max_steps: whether compiling a fused step pays (optim/fused.py)


@dataclass(frozen=True)
class Fsdp:
    """Whether an optimizer trains under FSDP exactly as one process does, checkpoint and resume included
    (tests/test_distributed_optimizers.py), or why it is refused."""

    verified: bool
    reason: str = ""  # why it is refused


VERIFIED = Fsdp(True)


def refused(reason: str) -> Fsdp:
    return Fsdp(False, reason)


UNTESTED = refused("it is not verified under FSDP yet (add it to tests/test_distributed_optimizers.py)")

# Searched for every optimizer by +sweep=lr_search, beside the optimizer's own space.
SHARED_SEARCH_SPACE = {"schedule.warmup_steps": "int(interval(0, 200))"}


@dataclass
class OptimizerSpec:
    name: str
    config: type  # dataclass subclassing OptimizerConfig
    build: Callable[[nn.Module, Any, BuildContext], torch.optim.Optimizer]
    state_bytes: Callable[[nn.Module, Any], float]  # theoretical optimizer-state bytes for this model
    # Optuna ranges for +sweep=lr_search (Hydra's sweep syntax), keyed by config path; "optimizer.lr" on a
    # log scale around the documented default. SHARED_SEARCH_SPACE is added.
    search_space: dict[str, str]
    fsdp: Fsdp = UNTESTED
    # Optional per-step hook factory: (model, optimizer, cfg, HookContext) -> hook(step), and
    # hook_every(cfg): the interval at which the hook does its work (Sophia: hessian_interval)
    hook: Callable | None = None
    hook_every: Callable[[Any], int] | None = None
    schedules_itself: bool = False  # the optimizer replaces the lr schedule (the trainer warns and ignores it)
    # train()/eval() modes (schedule-free): evaluate, sample and checkpoint in eval mode, train in train mode
    train_eval_modes: bool = False
    lr_fields: tuple[str, ...] = ("lr",)  # the learning rates that optimizer.scale_lr scales
    # The family's statistics, logged under opt/ every trainer.stats_interval steps: fn(StatsContext,
    # Reducer) (optim/stats.py). stats_previous_update: the statistics compare with the previous step's update.
    stats: Callable | None = None
    stats_previous_update: bool = False

    def space(self) -> dict[str, str]:
        return {**self.search_space, **SHARED_SEARCH_SPACE}


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


def register(name: str, config: type, state_bytes: Callable, *, search_space: dict[str, str], **extra) -> Callable:
    """Decorator of a build function: registers the optimizer `name` (see OptimizerSpec for `extra`)."""

    def decorator(build: Callable) -> Callable:
        if name in REGISTRY:
            where = f"{REGISTRY[name].build.__module__} and {build.__module__}"
            raise ValueError(f"optimizer {name!r} is registered twice ({where})")
        REGISTRY[name] = OptimizerSpec(name, config, build, state_bytes, search_space, **extra)
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


def optimizer_errors(cfg: OptimizerConfig) -> str | None:
    """The first invalid hyperparameter as one line (the config's validate()), or None."""
    if cfg.name not in load_all():
        return f"optimizer.name={cfg.name!r} is not one of {', '.join(sorted(REGISTRY))}"
    try:
        cfg.validate()
    except ValueError as e:
        return str(e)
    return None


def fsdp_errors(cfg: OptimizerConfig) -> str | None:
    """Why this optimizer cannot run under distributed=fsdp (its spec's verdict, or Lookahead), or None."""
    verdict = load_all()[cfg.name].fsdp
    if not verdict.verified:
        return f"optimizer={cfg.name} cannot run under distributed=fsdp: {verdict.reason}; use distributed=ddp"
    if cfg.lookahead.k is not None:
        from optim.lookahead import FSDP_REFUSED

        return f"optimizer.lookahead cannot run under distributed=fsdp: {FSDP_REFUSED}; use distributed=ddp"
    return None


# ---- the builder -------------------------------------------------------------------------------------


def scaled(cfg: OptimizerConfig, global_batch: int) -> OptimizerConfig:
    """Linear lr scaling (Goyal et al. 2017): lr x global_batch / reference_batch, when enabled."""
    if not cfg.scale_lr or global_batch == cfg.reference_batch:
        return cfg
    factor = global_batch / cfg.reference_batch
    changes = {name: getattr(cfg, name) * factor for name in load_all()[cfg.name].lr_fields}
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


def hook_every(cfg: OptimizerConfig) -> int:
    """Steps between the hook's refreshes (a step where it works: every multiple of this)."""
    spec = load_all()[cfg.name]
    return spec.hook_every(cfg) if spec.hook_every else 1


@contextlib.contextmanager
def eval_mode(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig):
    """Inside: the weights to evaluate, sample and checkpoint. Schedule-free optimizers switch to their
    averaged iterate x (and record eval mode in their state, so that train mode after loading restores the
    training iterate exactly); the others are untouched. Lookahead passes train() and eval() through."""
    switch = load_all()[cfg.name].train_eval_modes
    if switch:
        optimizer.eval()
    try:
        yield
    finally:
        if switch:
            optimizer.train()


def after_load(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig) -> None:
    """After loading a checkpoint (saved inside eval_mode): back to training mode."""
    if load_all()[cfg.name].train_eval_modes:
        optimizer.train()


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
