"""SophiaG: Sophia with the Gauss-Newton-Bartlett (GNB) diagonal Hessian estimator.

Algorithm (Liu, Li, Hall, Liang, Ma 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for
Language Model Pre-training", arXiv:2305.14342; reference code github.com/Liuhong99/Sophia, files
sophia.py and train_sophiag.py). Per coordinate, every step:

    m <- beta1 * m + (1 - beta1) * g
    p <- p * (1 - lr * weight_decay)                      (decoupled weight decay)
    p <- p - lr * sign(m) * min(|m| / (rho * bs * h + 1e-15), 1)

and every k steps (k = 10 in the paper), from the gradient g_hat of the loss against labels *sampled
from the model's own predictive distribution* (not the data labels):

    h <- beta2 * h + (1 - beta2) * g_hat * g_hat          (update_hessian)

The GNB estimator of the diagonal Gauss-Newton matrix is B * g_hat * g_hat with B the number of tokens
in the mini-batch; as in the reference, that factor B is not applied to h but folded into the step as
`bs` (here a group hyperparameter, the trainer passes the tokens per optimizer step; the reference
passes it as `step(bs=...)`). `rho` is the clipping scale gamma of the paper. There is no bias
correction and h starts at zero, so until the first update_hessian every step is lr * sign(m).

`gnb_hessian_update` does the estimator's forward/backward exactly as train_sophiag.py: forward without
targets, y ~ Categorical(logits) (detached), mean cross-entropy against y, backward, update_hessian(),
zero_grad(set_to_none=True). The trainer calls it right after the optimizer step of every k-th step.

How this implementation relates to the reference:
- Same state per parameter (`step`, a float32 0-dim CPU tensor as in the reference, `exp_avg`,
  `hessian`) and the same update rule; update_hessian is the reference's mul_/addcmul_ pair, so
  `hessian` is bit-identical to the reference's.
- The reference is a per-parameter Python loop; here every step is a handful of multi-tensor
  `torch._foreach_*` ops per (device, dtype) bucket of each param group. Two rewrites that are exact
  in exact arithmetic and differ from the reference only by float rounding (about 1 ulp):
  the momentum is one lerp (m + (1 - beta1) * (g - m)) instead of mul_ then add_, and
  sign(m) * min(|m| / d, 1) is computed as m / max(d, |m|) (d > 0), which lets one addcdiv apply it.
- The denominator d = rho * bs * h + 1e-15 is recomputed every step into a temporary. Caching it
  between Hessian refreshes would save two passes over memory per step but hold a third
  parameter-sized buffer; the optimizer keeps to the algorithm's 8 bytes of state per parameter.
- No `maximize`/`capturable`/complex support (the trainer does not use them).

Cost: a step is seven foreach ops per bucket (decay mul_, lerp_, mul, add_, abs, maximum_, addcdiv_),
about 16 parameter-sized memory passes against fused AdamW's 7 (one kernel); update_hessian adds about 12
passes every k steps. Unfused multi-tensor ops cannot go much lower (the clip needs its own
temporary); only a fused kernel (e.g. torch.compile of the same maths) reaches AdamW's cost.

Fused step (`fused=True`, optim/fused.py): `_sophia_kernel` and `_hessian_kernel`, the same ops compiled
into one loop per tensor (a step reads p, g, m, h and writes p, m: 6 passes; a Hessian refresh reads g, h
and writes h: 3), bit-identical to the foreach step on a CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer

from optim import checks, fused
from optim._foreach import CheckedOptimizer
from optim.builder import VERIFIED, BuildContext, HookContext, param_groups, per_param, register
from optim.stats import Reducer, StatsContext, local

_EPS = 1e-15  # the reference's constant in the denominator


class SophiaG(CheckedOptimizer):
    """Sophia-G. See the module docstring; call update_hessian() (via gnb_hessian_update) every k steps."""

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        bs: int = 5120,
        *,
        fused: bool = False,
    ):
        if not rho >= 0.0:
            raise ValueError(f"Invalid rho {rho!r}: it must be >= 0.")
        if not bs > 0:
            raise ValueError(f"Invalid bs {bs!r}: the tokens per optimizer step must be > 0.")
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, bs=bs)
        super().__init__(params, defaults)  # checks lr, betas and weight_decay
        self.fused = fused  # the compiled step (not a group value: a checkpoint resumes either way)

    @staticmethod
    def _init_state(p: torch.Tensor, state: dict) -> None:
        if len(state) == 0:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def update_hessian(self) -> None:
        """h <- beta2 * h + (1 - beta2) * grad * grad, from the current .grad (the sampled-label loss's)."""
        for group in self.param_groups:
            _, beta2 = group["betas"]
            params, grads, hessians = [], [], []
            for p in self.params_with_grad(group):
                state = self.state[p]
                self._init_state(p, state)
                params.append(p)
                grads.append(p.grad)
                hessians.append(state["hessian"])
            if not params:
                continue
            for (_, _), ((hs, gs), _) in Optimizer._group_tensors_by_device_and_dtype([hessians, grads]).items():
                if self.fused:
                    fused.run(_HESSIAN, _hessian_foreach, [hs, gs], fused.scalars(beta2, 1.0 - beta2), beta2=beta2)
                else:
                    _hessian_foreach(hs, gs, beta2=beta2)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.closure_loss(closure)

        for group in self.param_groups:
            beta1, _ = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            scale = group["rho"] * group["bs"]
            params, grads, exp_avgs, hessians, steps = [], [], [], [], []
            for p in self.params_with_grad(group):
                state = self.state[p]
                self._init_state(p, state)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                hessians.append(state["hessian"])
                steps.append(state["step"])
            if not params:
                continue

            torch._foreach_add_(steps, 1.0)
            grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, hessians])
            hp = dict(lr=lr, beta1=beta1, weight_decay=wd, scale=scale)
            for (_, _), ((ps, gs, ms, hs), _) in grouped.items():
                if self.fused:
                    args = fused.scalars(1.0 - lr * wd, 1.0 - beta1, scale, _EPS, -lr)
                    fused.run(_SOPHIA, _sophia_foreach, [ps, gs, ms, hs], args, **hp)
                else:
                    _sophia_foreach(ps, gs, ms, hs, **hp)
        return loss


def _sophia_foreach(ps, gs, ms, hs, *, lr: float, beta1: float, weight_decay: float, scale: float) -> None:
    if weight_decay != 0:
        torch._foreach_mul_(ps, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(ms, gs, 1.0 - beta1)
    # d = rho * bs * h + 1e-15 (the reference's order: h * scale, then + eps), then
    # sign(m) * min(|m| / d, 1) == m / max(d, |m|) since d > 0, applied by one addcdiv.
    den = torch._foreach_mul(hs, scale)
    torch._foreach_add_(den, _EPS)
    torch._foreach_maximum_(den, torch._foreach_abs(ms))
    torch._foreach_addcdiv_(ps, ms, den, value=-lr)


def _hessian_foreach(hs, gs, *, beta2: float) -> None:
    torch._foreach_mul_(hs, beta2)
    torch._foreach_addcmul_(hs, gs, gs, value=1.0 - beta2)


def _sophia_kernel(p, g, m, h, decay, interp, scale, eps, step):
    """_sophia_foreach for one tensor, rounded as ATen rounds it (optim/fused.py)."""
    m_new = fused.lerp(m, g, interp)
    m.copy_(m_new)
    p.copy_(fused.addcdiv(p * decay, m_new, torch.maximum(h * scale + eps, m_new.abs()), step))


def _hessian_kernel(h, g, beta2, one_minus_beta2):
    h.copy_(fused.addcmul(h * beta2, g, g, one_minus_beta2))


_SOPHIA = fused.Kernel(_sophia_kernel)
_HESSIAN = fused.Kernel(_hessian_kernel)


def gnb_hessian_update(
    model: nn.Module,
    optimizer: Optimizer,
    idx: torch.Tensor | Sequence[torch.Tensor],
    autocast_ctx: contextlib.AbstractContextManager | None = None,
    *,
    grad_clip: float = 0.0,
) -> None:
    """One Gauss-Newton-Bartlett refresh of optimizer's Hessian estimate (train_sophiag.py's k-th step).

    idx: input ids (B, T), or a sequence of micro-batches whose gradients are averaged (as the reference
    does over its gradient-accumulation steps). model(idx) must return (logits (B, T, V), loss=None).
    Labels are sampled from softmax(logits) (i.e. y ~ Categorical(logits), detached); the gradient of the
    mean cross-entropy against them feeds optimizer.update_hessian(), then grads are set to None.
    grad_clip > 0 clips that gradient's global norm first, as train_sophiag.py does with its grad_clip.
    The optimizer's `bs` should be the number of tokens in idx (all micro-batches together).

    Whatever .grad the parameters held on entry is put back afterwards, so a training gradient is never
    disturbed (the trainer calls this after optimizer.step() + zero_grad(), when there is none).
    Sampling draws from the global torch RNG of the logits' device.
    """
    micro = [idx] if isinstance(idx, torch.Tensor) else list(idx)
    if not micro:
        raise ValueError("gnb_hessian_update needs at least one batch of input ids.")
    ctx = autocast_ctx if autocast_ctx is not None else contextlib.nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        n = len(micro)
        for i, x in enumerate(micro):
            # DDP: all-reduce only on the last micro-batch, like the reference.
            sync = i == n - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                with ctx:
                    logits, _ = model(x)
                logits = logits.float()  # the loss in fp32 whatever the autocast dtype (as MiniGPT does)
                flat = logits.reshape(-1, logits.size(-1))
                with torch.no_grad():
                    # Categorical(logits).sample() is multinomial(softmax(logits), 1, replacement=True);
                    # done directly to avoid its extra normalised-logits copy of a (B*T, V) tensor.
                    y = torch.multinomial(torch.softmax(flat, dim=-1), 1, replacement=True).view(-1)
                loss = F.cross_entropy(flat, y)
                (loss / n).backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
        optimizer.update_hessian()
        optimizer.zero_grad(set_to_none=True)
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g


# ---- registration in the trainer's optimizer zoo ---------------------------------------------------


@dataclass
class SophiaConfig(fused.FusedConfig):
    betas: list[float] = field(default_factory=lambda: [0.965, 0.99])
    rho: float = 0.04
    hessian_interval: int = 10  # k: steps between Gauss-Newton-Bartlett refreshes

    def validate(self) -> None:
        super().validate()
        checks.betas(self)
        checks.positive(self, "rho")
        checks.require(self, "hessian_interval", lambda v: v >= 1, ">= 1")


def _hessian_hook(model: nn.Module, optimizer: Optimizer, cfg: SophiaConfig, ctx: HookContext) -> Callable:
    """After every k-th step, refresh the Hessian estimate on the micro-batches of the coming step, as
    train_sophiag.py does, clipped like the training gradient; `bs` is the tokens of that batch. The
    training data stream is left as it is, so Sophia trains on the same batches as any optimizer."""

    def hook(step: int) -> None:
        if step % cfg.hessian_interval == 0:
            batches = [x for x, _ in ctx.upcoming(ctx.n_micro)]
            gnb_hessian_update(model, optimizer, batches, ctx.autocast, grad_clip=ctx.grad_clip)

    return hook


def sophia_stats(ctx: StatsContext, out: Reducer) -> None:
    """SophiaG: the momentum, the diagonal Hessian estimate h, and how often the clip decides the step.

    m_norm                ||m|| (exp_avg) over all parameters.
    hessian_norm          ||h|| over all parameters. 0 until the first Gauss-Newton-Bartlett refresh.
    hessian/min|median|max  spread of h over coordinates (refreshed every hessian_interval steps).
    clipped_fraction      fraction of coordinates where |m| >= rho * bs * h + 1e-15, i.e. where the step is
                          the clipped lr * sign(m) rather than the Newton-like lr * m / (rho * bs * h). 1 before
                          the first refresh (Sophia is then sign descent with momentum). Near 1 throughout:
                          rho * bs * h is small next to |m| and Sophia acts like Lion; near 0: every step is
                          the curvature-scaled one, usually much smaller than lr (rho too large).
    """
    params, ms = ctx.state("exp_avg")
    hs = ctx.state("hessian")[1]
    out.norm("m_norm", ms)
    out.norm("hessian_norm", hs)
    out.spread("hessian", hs)
    scales = [ctx.group_of(p)["rho"] * ctx.group_of(p)["bs"] for p in params]
    clipped = [local(m).abs() >= local(h) * s + _EPS for m, h, s in zip(ms, hs, scales, strict=True)]
    out.fraction("clipped_fraction", clipped)


@register(
    "sophia", SophiaConfig, per_param(8), fsdp=VERIFIED, stats=sophia_stats,
    hook=_hessian_hook, hook_every=lambda cfg: cfg.hessian_interval,
    search_space={"optimizer.lr": "tag(log, interval(3e-5, 3e-3))", "optimizer.weight_decay": "interval(0.0, 0.3)",
                  "optimizer.rho": "tag(log, interval(0.01, 0.1))", "optimizer.betas.0": "interval(0.9, 0.98)"},
)  # fmt: skip
def _build(model: nn.Module, cfg: SophiaConfig, ctx: BuildContext) -> SophiaG:
    return SophiaG(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), rho=cfg.rho,
        bs=ctx.tokens_per_step, fused=fused.resolve(cfg, model.parameters(), ctx, "sophia"),
    )  # fmt: skip
