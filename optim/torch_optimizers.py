"""The optimizers torch.optim already has, registered with their configs: SGD (plain, heavy-ball
momentum, Nesterov), Adagrad, RMSprop, Adam, AdamW, Adafactor and Muon (paired with AdamW).

Fused kernels where torch has them for the device (Adam, AdamW, Adagrad on CPU and CUDA), else foreach.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from optim.builder import BuildContext, OptimizerConfig, numel, param_groups, per_param, register
from optim.combined import CombinedOptimizer


def _impl_kwargs(impl: str, device: torch.device, fused_ok: bool = True) -> dict:
    """torch.optim's fastest path: fused kernels (CUDA and CPU since torch 2.4), else foreach."""
    if impl == "auto":
        impl = "fused" if fused_ok and device.type in ("cuda", "cpu") else "foreach"
    if impl not in ("fused", "foreach", "for_loop"):
        raise ValueError(f"optimizer.impl={impl!r} must be auto, fused, foreach or for_loop")
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[impl]


@dataclass
class SGDConfig(OptimizerConfig):
    momentum: float = 0.0
    nesterov: bool = False
    dampening: float = 0.0


def _sgd(model: nn.Module, cfg: SGDConfig, ctx: BuildContext) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
        dampening=cfg.dampening, foreach=True,
    )  # fmt: skip


register("sgd", SGDConfig, "torch.optim.SGD", per_param(0))(_sgd)
register("momentum", SGDConfig, "torch.optim.SGD(momentum)", per_param(4))(_sgd)
register("nesterov", SGDConfig, "torch.optim.SGD(nesterov)", per_param(4))(_sgd)


@dataclass
class AdagradConfig(OptimizerConfig):
    eps: float = 1e-10
    lr_decay: float = 0.0
    initial_accumulator_value: float = 0.0


@register("adagrad", AdagradConfig, "torch.optim.Adagrad", per_param(4))
def _adagrad(model: nn.Module, cfg: AdagradConfig, ctx: BuildContext) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, lr_decay=cfg.lr_decay, eps=cfg.eps,
        initial_accumulator_value=cfg.initial_accumulator_value, foreach=True,
    )  # fmt: skip


@dataclass
class RMSpropConfig(OptimizerConfig):
    alpha: float = 0.99
    eps: float = 1e-8
    momentum: float = 0.0
    centered: bool = False


def _rmsprop_bytes(model: nn.Module, cfg: RMSpropConfig) -> float:
    return (4 + 4 * (cfg.momentum > 0) + 4 * cfg.centered) * numel(model)


@register("rmsprop", RMSpropConfig, "torch.optim.RMSprop", _rmsprop_bytes)
def _rmsprop(model: nn.Module, cfg: RMSpropConfig, ctx: BuildContext) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps,
        momentum=cfg.momentum, centered=cfg.centered, foreach=True,
    )  # fmt: skip


@dataclass
class AdamConfig(OptimizerConfig):
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    impl: str = "auto"  # auto | fused | foreach | for_loop


@register("adam", AdamConfig, "torch.optim.Adam", per_param(8))
def _adam(model: nn.Module, cfg: AdamConfig, ctx: BuildContext) -> torch.optim.Optimizer:
    # Adam's weight_decay is the L2 penalty added to the gradient (coupled), unlike AdamW.
    return torch.optim.Adam(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
        **_impl_kwargs(cfg.impl, ctx.device),
    )  # fmt: skip


@register("adamw", AdamConfig, "torch.optim.AdamW", per_param(8))
def _adamw(model: nn.Module, cfg: AdamConfig, ctx: BuildContext) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
        **_impl_kwargs(cfg.impl, ctx.device),
    )  # fmt: skip


@dataclass
class AdafactorConfig(OptimizerConfig):
    beta2_decay: float = -0.8
    eps1: float | None = None  # None: torch's default, the dtype's eps
    eps2: float = 1e-3
    d: float = 1.0  # update clipping threshold


def _adafactor_bytes(model: nn.Module, cfg: AdafactorConfig) -> float:
    """Factored second moment: a row and a column vector per matrix, a full vector otherwise (fp32)."""
    total = 0
    for p in model.parameters():
        if p.dim() >= 2:
            total += 4 * (p.numel() // p.shape[-1] + p.numel() // p.shape[-2])
        else:
            total += 4 * p.numel()
    return total


@register("adafactor", AdafactorConfig, "torch.optim.Adafactor", _adafactor_bytes)
def _adafactor(model: nn.Module, cfg: AdafactorConfig, ctx: BuildContext) -> torch.optim.Optimizer:
    return torch.optim.Adafactor(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, beta2_decay=cfg.beta2_decay,
        eps=(cfg.eps1, cfg.eps2), d=cfg.d, foreach=True,
    )  # fmt: skip


@dataclass
class MuonConfig(OptimizerConfig):
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    eps: float = 1e-7
    adjust_lr_fn: str | None = None  # null/"original" (Keller Jordan) or "match_rms_adamw" (Moonshot)
    # AdamW for what Muon does not take: embeddings, the tied head, norms and biases
    adamw_lr: float = 1e-3
    adamw_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adamw_eps: float = 1e-8
    adamw_weight_decay: float = 0.1


def muon_params(model: nn.Module) -> list[nn.Parameter]:
    """Hidden 2-D matrices: every 2-D parameter except embeddings (and the head tied to them)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [p for p in model.parameters() if p.requires_grad and p.dim() == 2 and id(p) not in embeddings]


def _muon_bytes(model: nn.Module, cfg: MuonConfig) -> float:
    hidden = {id(p) for p in muon_params(model)}
    return 4 * numel(model, lambda p: id(p) in hidden) + 8 * numel(model, lambda p: id(p) not in hidden)


@register("muon", MuonConfig, "torch.optim.Muon + torch.optim.AdamW", _muon_bytes)
def _muon(model: nn.Module, cfg: MuonConfig, ctx: BuildContext) -> torch.optim.Optimizer:
    hidden = muon_params(model)
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in hidden_ids]
    muon = torch.optim.Muon(
        hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov,
        eps=cfg.eps, ns_steps=cfg.ns_steps, adjust_lr_fn=cfg.adjust_lr_fn,
    )  # fmt: skip
    adamw = torch.optim.AdamW(
        param_groups(model, cfg.adamw_weight_decay, rest), lr=cfg.adamw_lr, betas=tuple(cfg.adamw_betas),
        eps=cfg.adamw_eps, **_impl_kwargs("auto", ctx.device),
    )  # fmt: skip
    return CombinedOptimizer([muon, adamw])
