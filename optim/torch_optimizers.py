"""The optimizers torch.optim already has, registered with their configs: SGD (plain, heavy-ball
momentum, Nesterov), Adagrad, RMSprop, Adam, AdamW, Adafactor and Muon (paired with AdamW).

Fused kernels where torch has them for the device (Adam, AdamW, Adagrad on CPU and CUDA), else foreach.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from optim import checks, fused
from optim.builder import VERIFIED, BuildContext, OptimizerConfig, numel, param_groups, per_param, refused, register
from optim.combined import CombinedOptimizer
from optim.stats import Reducer, StatsContext, local

IMPLS = ("auto", "fused", "foreach", "for_loop")


def _impl_kwargs(impl: str, device: torch.device, fused_ok: bool = True) -> dict:
    """torch.optim's fastest path: fused kernels (CUDA and CPU since torch 2.4), else foreach."""
    if impl == "auto":
        impl = "fused" if fused_ok and device.type in ("cuda", "cpu") else "foreach"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[impl]


@dataclass
class SGDConfig(OptimizerConfig):
    momentum: float = 0.0
    nesterov: bool = False
    dampening: float = 0.0

    def validate(self) -> None:
        super().validate()
        checks.below_one(self, "momentum")
        checks.require(self, "dampening", lambda v: 0 <= v <= 1, "in [0, 1]")


def _sgd(model: nn.Module, cfg: SGDConfig, ctx: BuildContext) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
        dampening=cfg.dampening, foreach=True,
    )  # fmt: skip


def momentum_stats(ctx: StatsContext, out: Reducer) -> None:
    """Momentum buffers (SGD momentum / Nesterov, RMSprop with momentum, Muon); nothing without them.

    momentum_norm      ||buf|| over all parameters (after the step, so it includes this gradient).
    cos_momentum_grad  cos(buf, g), buffers and gradients each read as one long vector. Near 1: the
                       gradient keeps pointing where the momentum goes (steady descent); near 0 or
                       negative: the gradient oscillates around the momentum direction (noise or
                       curvature dominates, and the buffer averages it out).
    """
    params, bufs = ctx.state("momentum_buffer")
    if bufs:
        out.norm("momentum_norm", bufs)
        out.cosine("cos_momentum_grad", bufs, [ctx.grads[i] for i in ctx.positions(params)])


def sgd_stats(ctx: StatsContext, out: Reducer) -> None:
    """SGD, heavy-ball momentum and Nesterov: `momentum_stats` (when momentum > 0), and

    descent_cos  cos(update, -g) over all parameters: 1 for plain SGD without weight decay (the step
                 goes straight down this step's gradient); below 1 as weight decay or momentum turn it.
    """
    momentum_stats(ctx, out)
    where = [i for i, g in enumerate(ctx.grads) if g is not None]
    out.cosine("_cos/update_grad", [ctx.updates[i] for i in where], [ctx.grads[i] for i in where])
    out.derive("descent_cos", lambda v: -v["_cos/update_grad"])


_SGD_SPACE = {"optimizer.lr": "tag(log, interval(5e-3, 0.5))", "optimizer.momentum": "interval(0.8, 0.98)"}
register(
    "sgd", SGDConfig, per_param(0), fsdp=VERIFIED, stats=sgd_stats,
    search_space={"optimizer.lr": "tag(log, interval(0.05, 5.0))",
                  "optimizer.weight_decay": "tag(log, interval(1e-6, 1e-3))"},
)(_sgd)  # fmt: skip
register("momentum", SGDConfig, per_param(4), search_space=_SGD_SPACE, fsdp=VERIFIED, stats=sgd_stats)(_sgd)
register("nesterov", SGDConfig, per_param(4), search_space=_SGD_SPACE, fsdp=VERIFIED, stats=sgd_stats)(_sgd)


@dataclass
class AdagradConfig(OptimizerConfig):
    eps: float = 1e-10
    lr_decay: float = 0.0
    initial_accumulator_value: float = 0.0

    def validate(self) -> None:
        super().validate()
        checks.positive(self, "eps")
        checks.non_negative(self, "lr_decay", "initial_accumulator_value")


def accumulator_stats(ctx: StatsContext, out: Reducer) -> None:
    """Adagrad and RMSprop: their second-moment-like state v (Adagrad's running sum of g^2, RMSprop's
    moving average square_avg), and the per-coordinate step it gives.

    v_norm                ||v|| over all parameters.
    v/min|median|max      spread of |v| over coordinates. Adagrad's v only grows, so its steps only shrink.
    step_size/min|median|max  the multiplier of g in the update, per coordinate: Adagrad
                          lr / (1 + (t - 1) * lr_decay) / (sqrt(v) + eps); RMSprop lr / (sqrt(v) + eps), or
                          lr / (sqrt(v - grad_avg^2) + eps) when centered (with momentum, the multiplier of g
                          in the buffer's increment, times lr). A max far above the median: coordinates
                          whose gradients were tiny so far take huge steps when one arrives.
    plus `momentum_stats` for RMSprop with momentum.
    """
    adagrad = bool(ctx.state("sum")[0])
    params, vs = ctx.state("sum" if adagrad else "square_avg")
    out.norm("v_norm", vs)
    out.spread("v", vs)

    def step_size(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        group, state = ctx.group_of(p), ctx.optimizer.state[p]
        if adagrad:
            return group["lr"] / (1 + (local(state["step"]) - 1) * group["lr_decay"]) / (local(v).sqrt() + group["eps"])
        if "grad_avg" in state:  # centered: v - grad_avg^2, as torch computes it
            v = local(v).addcmul(local(state["grad_avg"]), local(state["grad_avg"]), value=-1)
        return group["lr"] / (local(v).sqrt() + group["eps"])

    out.spread("step_size", (step_size(p, v) for p, v in zip(params, vs, strict=True)))
    momentum_stats(ctx, out)


@register(
    "adagrad", AdagradConfig, per_param(4), fsdp=VERIFIED, stats=accumulator_stats,
    search_space={"optimizer.lr": "tag(log, interval(1e-3, 1e-1))",
                  "optimizer.initial_accumulator_value": "interval(0.0, 0.1)"},
)  # fmt: skip
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

    def validate(self) -> None:
        super().validate()
        checks.below_one(self, "alpha", "momentum")
        checks.positive(self, "eps")


def _rmsprop_bytes(model: nn.Module, cfg: RMSpropConfig) -> float:
    return (4 + 4 * (cfg.momentum > 0) + 4 * cfg.centered) * numel(model)


@register(
    "rmsprop", RMSpropConfig, _rmsprop_bytes, fsdp=VERIFIED, stats=accumulator_stats,
    search_space={"optimizer.lr": "tag(log, interval(1e-4, 1e-2))", "optimizer.alpha": "interval(0.9, 0.999)",
                  "optimizer.momentum": "interval(0.0, 0.9)"},
)  # fmt: skip
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

    def validate(self) -> None:
        super().validate()
        checks.betas(self)
        checks.positive(self, "eps")
        checks.require(self, "impl", lambda v: v in IMPLS, "auto, fused, foreach or for_loop")


def adam_step_size(ctx: StatsContext, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Adam's per-coordinate multiplier of m, as torch computes the step: lr / (1 - beta1^t) / (sqrt(v) /
    sqrt(1 - beta2^t) + eps), with t the parameter's step count (a tensor: no host sync)."""
    group, t = ctx.group_of(p), local(ctx.optimizer.state[p]["step"])
    beta1, beta2 = group["betas"]
    return group["lr"] / (1 - beta1**t) / (local(v).float().sqrt() / (1 - beta2**t).sqrt() + group["eps"])


def adam_moment_stats(ctx: StatsContext, out: Reducer, params, ms, vs, v_name: str = "v") -> None:
    """The keys of `adam_stats` from given moment tensors (the state's, or dequantised ones)."""
    out.norm("m_norm", ms)
    out.norm(f"{v_name}_norm", vs)
    out.spread(v_name, vs)
    out.spread("step_size", (adam_step_size(ctx, p, v) for p, v in zip(params, vs, strict=True)))


def adam_stats(ctx: StatsContext, out: Reducer) -> None:
    """Adam and AdamW: the moments m (exp_avg) and v (exp_avg_sq) as stored (not bias-corrected).

    m_norm, v_norm        ||m|| and ||v|| over all parameters. ||m|| against grad/norm: m is a smoothed
                          gradient; ||m|| well below ||g|| means the gradients' directions mostly cancel.
    v/min|median|max      spread of v = EMA of g^2 over coordinates: how unevenly the gradient scale is
                          spread. A min of 0 means coordinates that never got a gradient (unused tokens).
    step_size/min|median|max  the per-coordinate step Adam takes per unit of m, exactly as torch's update:
                          lr / (1 - beta1^t) / (sqrt(v) / sqrt(1 - beta2^t) + eps). Its median is the
                          typical effective learning rate; a max near lr / eps flags coordinates whose v is
                          ~0, where one gradient makes a step of about lr. AdamW's decay is not included.
    """
    params, ms = ctx.state("exp_avg")
    adam_moment_stats(ctx, out, params, ms, ctx.state("exp_avg_sq")[1])


ADAM_SPACE = {
    "optimizer.lr": "tag(log, interval(1e-4, 1e-2))",
    "optimizer.weight_decay": "interval(0.0, 0.3)",
    "optimizer.betas.0": "interval(0.8, 0.95)",
    "optimizer.betas.1": "interval(0.9, 0.999)",
}


@register(
    "adam", AdamConfig, per_param(8), fsdp=VERIFIED, stats=adam_stats,
    search_space={k: v for k, v in ADAM_SPACE.items() if k != "optimizer.weight_decay"},  # an L2 penalty: left at 0
)  # fmt: skip
def _adam(model: nn.Module, cfg: AdamConfig, ctx: BuildContext) -> torch.optim.Optimizer:
    # Adam's weight_decay is the L2 penalty added to the gradient (coupled), unlike AdamW.
    return torch.optim.Adam(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
        **_impl_kwargs(cfg.impl, ctx.device),
    )  # fmt: skip


@register("adamw", AdamConfig, per_param(8), search_space=ADAM_SPACE, fsdp=VERIFIED, stats=adam_stats)
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

    def validate(self) -> None:
        super().validate()
        checks.positive(self, "eps1", "eps2", "d")
        checks.require(self, "beta2_decay", lambda v: v <= 0, "<= 0")


def _adafactor_bytes(model: nn.Module, cfg: AdafactorConfig) -> float:
    """Factored second moment: a row and a column vector per matrix, a full vector otherwise (fp32)."""
    total = 0
    for p in model.parameters():
        if p.dim() >= 2:
            total += 4 * (p.numel() // p.shape[-1] + p.numel() // p.shape[-2])
        else:
            total += 4 * p.numel()
    return total


def adafactor_stats(ctx: StatsContext, out: Reducer) -> None:
    """Adafactor's factored second moment: per matrix a row factor R and a column factor C (EMAs of the
    mean of g^2 along rows and columns), per vector a full EMA of g^2.

    row_var/min|median|max, col_var/min|median|max  spread of the factors over all matrices.
    v/min|median|max      spread of the second-moment estimate V per coordinate, as the step uses it:
                          R C / mean(R) for matrices, the EMA for vectors. Compared with Adam's v, the
                          factored V cannot follow a single large coordinate: its max is smoother.
    update_rms/min|median|max  per tensor, RMS of U = g / sqrt(V) before update clipping (exact). About 1
                          while V tracks g^2; well above 1: g grew faster than V follows (V is stale).
    clipped_tensor_fraction  fraction of tensors whose U was clipped (RMS(U) > d, then scaled to RMS d).
                          With d = 1 many tensors clip by a hair (RMS just above 1): what matters is how far
                          update_rms/max exceeds d.
    """
    rows, cols = ctx.state("row_var")[1], ctx.state("col_var")[1]
    out.spread("row_var", rows)
    out.spread("col_var", cols)
    params = [p for p, g in zip(ctx.params, ctx.grads, strict=True) if g is not None and ctx.optimizer.state.get(p)]

    def estimate(p: torch.Tensor) -> torch.Tensor:
        state, eps1 = ctx.optimizer.state[p], ctx.group_of(p)["eps"][0] or torch.finfo(p.dtype).eps
        if "row_var" not in state:
            return local(state["variance"])
        row = local(state["row_var"])
        return row @ local(state["col_var"]) / row.mean(dim=-2, keepdim=True).clamp(min=eps1)

    out.spread("v", (estimate(p) for p in params))
    for k, (p, i) in enumerate(zip(params, ctx.positions(params), strict=True)):
        eps1 = ctx.group_of(p)["eps"][0] or torch.finfo(p.dtype).eps
        u = local(ctx.grads[i]) * estimate(p).clamp(min=eps1 * eps1).rsqrt()
        out.add_sum(f"_sq/update/{k}", u.square().sum())
    rms = [(k, p.numel(), ctx.group_of(p)["d"]) for k, p in enumerate(params)]
    out.spread_of("update_rms", lambda v: [(v[f"_sq/update/{k}"] / n) ** 0.5 for k, n, _ in rms])
    out.derive(
        "clipped_tensor_fraction",
        lambda v: sum((v[f"_sq/update/{k}"] / n) ** 0.5 > d for k, n, d in rms) / max(len(rms), 1),
    )


@register(
    "adafactor", AdafactorConfig, _adafactor_bytes, stats=adafactor_stats,
    fsdp=refused("Adafactor's factored moments average whole rows and columns, and FSDP shards them"),
    search_space={"optimizer.lr": "tag(log, interval(1e-3, 1e-1))", "optimizer.weight_decay": "interval(0.0, 0.1)",
                  "optimizer.beta2_decay": "interval(-1.0, -0.5)"},
)  # fmt: skip
def _adafactor(model: nn.Module, cfg: AdafactorConfig, ctx: BuildContext) -> torch.optim.Optimizer:
    return torch.optim.Adafactor(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, beta2_decay=cfg.beta2_decay,
        eps=(cfg.eps1, cfg.eps2), d=cfg.d, foreach=True,
    )  # fmt: skip


@dataclass
class MuonConfig(fused.FusedConfig):  # fused: the elementwise work around Newton-Schulz (optim/muon_fused.py)
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

    def validate(self) -> None:
        super().validate()
        checks.below_one(self, "momentum")
        checks.require(self, "ns_steps", lambda v: v >= 1, ">= 1")
        checks.positive(self, "eps", "adamw_lr", "adamw_eps")
        checks.require(self, "adjust_lr_fn", lambda v: v in ("original", "match_rms_adamw"),
                       "null, original or match_rms_adamw")  # fmt: skip
        checks.betas(self, "adamw_betas")
        checks.non_negative(self, "adamw_weight_decay")


def muon_params(model: nn.Module) -> list[nn.Parameter]:
    """Hidden 2-D matrices: every 2-D parameter except embeddings and the output head, tied to them or not
    (model.tie_embeddings=false): Muon is for the matrices in between, AdamW takes the outer ones."""
    outer = {id(m.weight) for name, m in model.named_modules()
             if isinstance(m, nn.Embedding) or name.endswith("lm_head")}  # fmt: skip
    return [p for p in model.parameters() if p.requires_grad and p.dim() == 2 and id(p) not in outer]


def _muon_bytes(model: nn.Module, cfg: MuonConfig) -> float:
    hidden = {id(p) for p in muon_params(model)}
    return 4 * numel(model, lambda p: id(p) in hidden) + 8 * numel(model, lambda p: id(p) not in hidden)


def _muon_lr(group: dict, shape: torch.Size) -> float:
    """torch.optim.Muon's adjusted lr for a matrix of this shape (its `_adjust_lr`)."""
    rows, cols = shape[:2]
    if group["adjust_lr_fn"] in (None, "original"):
        return group["lr"] * math.sqrt(max(1, rows / cols))
    return group["lr"] * (0.2 * math.sqrt(max(rows, cols)) if group["adjust_lr_fn"] == "match_rms_adamw" else 1.0)


def muon_stats(ctx: StatsContext, out: Reducer) -> None:
    """Muon for the hidden matrices, AdamW for the rest (CombinedOptimizer).

    momentum_norm, cos_momentum_grad  Muon's momentum buffers (see `momentum_stats`).
    ortho_norm            ||O|| (Frobenius, all Muon matrices): O = NS(momentum) is the orthogonalised
                          update, recovered exactly from the step as -(update + lr * wd * p) / adjusted lr
                          (torch.optim.Muon applies p <- p (1 - lr wd) - adjusted_lr O).
    ortho_sv_rms/min|median|max  per matrix, ||O|| / sqrt(min(rows, cols)): the RMS singular value of O.
                          Newton-Schulz leaves the singular values roughly in 0.5-1.5 rather than at 1
                          (torch.optim.Muon's docstring), so about 1 is normal (0.9 on the tests' tiny
                          model); well below 1: the momentum matrix was close to low rank.
    adamw/...             `adam_stats` of the AdamW part (embeddings, head, norms, biases).
    """
    for inner in ctx.optimizer.optimizers:
        sub = replace(ctx, optimizer=inner)
        if not isinstance(inner, torch.optim.Muon):
            adam_stats(sub, out.scoped("adamw/"))
            continue
        momentum_stats(sub, out)
        params = [p for p in ctx.params if p in inner.state]
        for k, (p, i) in enumerate(zip(params, ctx.positions(params), strict=True)):
            group = sub.group_of(p)
            decay = group["lr"] * group["weight_decay"] * ctx.before[i].float()
            ortho = (ctx.updates[i].float() + decay) / _muon_lr(group, p.shape)
            out.add_sum(f"_sq/ortho/{k}", ortho.square().sum())
        ranks = [min(p.shape) for p in params]
        out.derive("ortho_norm", lambda v, r=ranks: sum(v[f"_sq/ortho/{k}"] for k in range(len(r))) ** 0.5)
        out.spread_of("ortho_sv_rms", lambda v, r=ranks: [(v[f"_sq/ortho/{k}"] / n) ** 0.5 for k, n in enumerate(r)])


@register(
    "muon", MuonConfig, _muon_bytes, lr_fields=("lr", "adamw_lr"), stats=muon_stats,
    fsdp=refused("Muon orthogonalises whole matrices, and FSDP gives each rank a shard"),
    search_space={"optimizer.lr": "tag(log, interval(2e-3, 0.2))", "optimizer.momentum": "interval(0.85, 0.98)",
                  "optimizer.adamw_lr": "tag(log, interval(1e-4, 1e-2))",
                  "optimizer.weight_decay": "interval(0.0, 0.1)"},
)  # fmt: skip
def _muon(model: nn.Module, cfg: MuonConfig, ctx: BuildContext) -> torch.optim.Optimizer:
    hidden = muon_params(model)
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in hidden_ids]
    from optim.muon_fused import FusedMuon

    muon_class = FusedMuon if fused.resolve(cfg, hidden, ctx, "muon") else torch.optim.Muon
    muon = muon_class(
        hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov,
        eps=cfg.eps, ns_steps=cfg.ns_steps, adjust_lr_fn=cfg.adjust_lr_fn,
    )  # fmt: skip
    adamw = torch.optim.AdamW(
        param_groups(model, cfg.adamw_weight_decay, rest), lr=cfg.adamw_lr, betas=tuple(cfg.adamw_betas),
        eps=cfg.adamw_eps, **_impl_kwargs("auto", ctx.device),
    )  # fmt: skip
    return CombinedOptimizer([muon, adamw])
