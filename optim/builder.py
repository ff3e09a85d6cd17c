"""Optimizer builder: config -> torch optimizer with decay / no-decay parameter groups.

The registry maps `optimizer.name` to a factory; the next optimizers plug in here with one entry.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from trainer.config import OptimizerConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings (dim >= 2); never biases or LayerNorm gains (dim < 2).

    Tied parameters appear once: named_parameters() de-duplicates them.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _impl_kwargs(impl: str, device: torch.device) -> dict:
    """torch.optim's fastest path: fused kernels (CUDA and CPU since torch 2.4), else foreach."""
    if impl == "auto":
        impl = "fused" if device.type in ("cuda", "cpu") else "foreach"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[impl]


def _adamw(groups: list[dict], cfg: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **_impl_kwargs(cfg.impl, device))


OPTIMIZERS: dict[str, Callable[[list[dict], OptimizerConfig, torch.device], torch.optim.Optimizer]] = {
    "adamw": _adamw,
}


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name](param_groups(model, cfg.weight_decay), cfg, device)
