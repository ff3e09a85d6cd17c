"""LAMB: Layer-wise Adaptive Moments for Batch training.

You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes"
(ICLR 2020, arXiv:1904.00962), Algorithm 2. For every parameter tensor p (a "layer"), with gradient g,
step t = 1, 2, ..., learning rate lr, weight decay wd:

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)
    r = m_hat / (sqrt(v_hat) + eps) + wd * p
    trust_ratio = ||p|| / ||r||              (1 where ||p|| = 0 or ||r|| = 0)
    p = p - lr * trust_ratio * r

with Frobenius norms over the whole tensor, and the paper's scaling function phi(z) = z (no clipping of
||p||). This is LAMB as in the published paper and in NVIDIA's FusedLAMB / TensorFlow Addons' LAMB.

Reference code: `pytorch_optimizer.Lamb` (kozistr/pytorch_optimizer, 4.1.0), which descends from
cybertronai/pytorch-lamb. It computes exactly the update above with `weight_decouple=False` (weight
decay inside r), `adam=False`, `pre_norm=False`, `grad_averaging=True`, `rectify=False`,
`adam_debias=True` -- except for three details where its defaults are not the paper's, and where
this file follows the paper:

- no bias correction of v, and m's bias correction is applied to the step size *after* the trust
  ratio (`lr / (1 - beta1^t)`; arXiv v3 of the paper had no bias correction, the published version has
  it inside r). Since the trust ratio is invariant to the scale of r, the difference is only where
  eps and wd * p enter r; the test drives the reference with a per-step eps and wd that make its r
  proportional to the paper's, and it then agrees with this file to float rounding;
- ||p|| is clamped to at most 10 before the ratio (`Lamb.clamp = 10.0`, a phi of cybertronai's);
- the ratio is ||p|| / (||r|| + eps) rather than ||p|| / ||r||.

Implementation. The first part of r, m_hat / (sqrt(v_hat) + eps) with the moment updates, is exactly
Adam's update direction, so it comes from torch's multi-tensor fused Adam kernel (`torch._fused_adam_`,
the kernel behind `torch.optim.Adam(fused=True)`, on CPU, CUDA, MPS, ...), run with lr = 1 on a
scratch list x that starts at -wd * p: one pass updates m and v and leaves x = -r. Then two
`_foreach_norm`s give the per-tensor trust ratios (kept on the device: no host sync), and one
`_foreach_addcmul_` applies p += lr * trust_ratio * x. One temporary list (x) per step; the gradients
are not modified. Bias corrections are per tensor (from each tensor's own step), as in the paper.
Under FSDP2 each rank holds shards (DTensors): the norms of a sharded tensor are all-reduced over the
ranks, so the trust ratio is still the whole tensor's (tested against one process).

State per parameter: `step` (a float32 scalar tensor on the parameter's device, as in torch's fused
Adam), `exp_avg` (m) and `exp_avg_sq` (v), tensors like the parameter.

Cost: about 14 passes over parameter-sized memory (x = -wd * p, the fused Adam pass, two norms, the
update) against the 7 of one fused AdamW kernel; written with separate foreach ops, the Adam part alone
takes about 20.

Fused step (`fused=True`, optim/fused.py): the same three stages one tensor at a time, so x needs one
scratch buffer the size of the largest tensor (kept between steps) instead of a list for all of them.
`_lamb_direction_kernel` is the first two lines compiled into one loop (reads p, g, m, v; writes m, v
and x), torch's own norm kernel gives ||p|| and ||x||, and `_lamb_apply_kernel` applies p += lr * ratio
* x (reads p, x; writes p): 12 passes over memory against fused AdamW's 7, with the square root and
divisions once (a reduction cannot share a loop with Inductor's stores, and the ratio needs the
whole tensor's norm before any element moves). Bit-identical to the foreach step on a CPU except a
tensor's last size % 16 elements of v, which torch's fused Adam kernel rounds in another order (tested:
parameters within 1e-6 of it after 20 steps). Under FSDP each rank sums the squares of its shards in
float64 and the sums are all-reduced, tensor by tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from optim import checks, fused
from optim._foreach import CheckedOptimizer
from optim.builder import VERIFIED, BuildContext, param_groups, per_param, register
from optim.stats import Reducer, StatsContext, local


class Lamb(CheckedOptimizer):
    """LAMB (You et al. 2020). See the module docstring for the update and its reference."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        fused: bool = False,
    ):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.fused = fused  # the compiled step (not a group value: a checkpoint resumes either way)
        self._scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def scratch(self, like: torch.Tensor) -> torch.Tensor:
        """A flat buffer of like.numel() elements for the fused step's x, reused tensor after tensor and kept
        between steps (the size of the largest tensor): fresh memory would be page-faulted every step."""
        key = (like.device, like.dtype)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < like.numel():
            buffer = self._scratch[key] = torch.empty(like.numel(), device=like.device, dtype=like.dtype)
        return buffer[: like.numel()]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = self.closure_loss(closure)

        for group in self.param_groups:
            buckets: dict[tuple[torch.device, torch.dtype], tuple[list, list, list, list, list]] = {}
            for p in self.params_with_grad(group):
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif state["step"].device != p.device:  # e.g. a CPU checkpoint resumed on CUDA
                    state["step"] = state["step"].to(p.device)
                ps, gs, ms, vs, ts = buckets.setdefault((p.device, p.dtype), ([], [], [], [], []))
                ps.append(p)
                gs.append(p.grad)
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
                ts.append(state["step"])

            beta1, beta2 = group["betas"]
            for ps, gs, ms, vs, ts in buckets.values():
                update = functools.partial(_lamb_fused, self) if self.fused else _lamb_multi_tensor
                update(
                    ps, gs, ms, vs, ts, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"],
                )  # fmt: skip
        return loss


def _lamb_multi_tensor(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    torch._foreach_add_(steps, 1.0)
    # x = -wd * p - m_hat / (sqrt(v_hat) + eps) = -r, with m and v updated in the same pass.
    x = torch._foreach_mul(params, -weight_decay)
    torch._fused_adam_(
        x, grads, exp_avgs, exp_avg_sqs, [], steps, lr=1.0, beta1=beta1, beta2=beta2, weight_decay=0.0,
        eps=eps, amsgrad=False, maximize=False,
    )  # fmt: skip
    # Trust ratio ||p|| / ||r|| per tensor (1 where a norm is 0), then p += lr * ratio * x.
    p_norm = torch.stack(torch._foreach_norm(params))
    r_norm = torch.stack(torch._foreach_norm(x))
    ratio = torch.where((p_norm > 0) & (r_norm > 0), p_norm / r_norm, 1.0)
    torch._foreach_addcmul_(params, x, ratio.mul_(lr).unbind())


def _lamb_direction_kernel(p, g, m, v, x, neg_wd, interp, beta2, one_minus_beta2, eps, neg_inv_bc1, bc2_sqrt):
    """The first two lines of _lamb_multi_tensor for one tensor: m and v updated and x = -wd * p - m_hat /
    (sqrt(v_hat) + eps) = -r written, rounded as torch._fused_adam_ rounds them on a CPU (lr 1)."""
    m_new = fused.lerp(m, g, interp)
    v_new = fused.addcmul(v * beta2, g, g, one_minus_beta2)
    m.copy_(m_new)
    v.copy_(v_new)
    x.copy_(fused.addcdiv(p * neg_wd, m_new, v_new.sqrt() / bc2_sqrt + eps, neg_inv_bc1))


def _lamb_apply_kernel(p, x, ratio):
    """p += (lr * trust ratio) * x, as _foreach_addcmul_ rounds it."""
    p.copy_(fused.fma(x, ratio, p))


_LAMB_DIRECTION = fused.Kernel(_lamb_direction_kernel)
_LAMB_APPLY = fused.Kernel(_lamb_apply_kernel)


def _lamb_fused(
    optimizer: Lamb,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """_lamb_multi_tensor one tensor at a time: the compiled direction kernel into a scratch buffer, torch's
    norms of p and x (under FSDP: float64 sums of the shards' squares, all-reduced), the ratio, the
    compiled update. Tensors the kernels do not take go through _lamb_multi_tensor together."""
    hp = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    locals_ = [[fused.local(t) for t in item] for item in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)]
    take = [fused.fusable(*item) for item in locals_]
    sharded = fused.shard_group(params[0]) is not None
    if not sharded:  # plain tensors the kernels do not take: the foreach step, together
        items = zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True)
        rest = [item for item, ok in zip(items, take, strict=True) if not ok]
        if rest:
            _lamb_multi_tensor(*map(list, zip(*rest, strict=True)), **hp)
    # Under FSDP every rank joins every tensor's sums; a shard too small for the kernels (under 2 elements)
    # runs the same functions uncompiled.
    todo = [(item, param, step, ok) for item, param, step, ok in zip(locals_, params, steps, take, strict=True)
            if ok or sharded]  # fmt: skip
    torch._foreach_add_([step for _, _, step, _ in todo], 1.0)
    args = fused.scalars(-weight_decay, 1.0 - beta1, beta2, 1.0 - beta2, eps)
    for (p, g, m, v), param, step, ok in todo:
        t = step.double()  # bias corrections in float64 on the step's device (no host sync), as fused Adam's
        c1, c2 = -1.0 / (1.0 - beta1**t), (1.0 - beta2**t).sqrt()
        x = optimizer.scratch(p)
        if ok:
            _LAMB_DIRECTION(*map(fused.flat, (p, g, m, v, x)), *args, c1, c2)
        else:
            _lamb_direction_kernel(p, g, m, v, x.view(p.shape), *args, c1, c2)
        if sharded:
            sums = torch.stack([p.double().square().sum(), x.double().square().sum()])
            torch.distributed.all_reduce(sums, group=fused.shard_group(param))
            p_norm, r_norm = sums.sqrt().float().unbind()
        else:
            p_norm, r_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(x)
        ratio = torch.where((p_norm > 0) & (r_norm > 0), p_norm / r_norm, 1.0).mul_(lr)
        if ok:
            _LAMB_APPLY(fused.flat(p), fused.flat(x), ratio)
        else:
            _lamb_apply_kernel(p, x.view(p.shape), ratio)


# ---- registration in the trainer's optimizer zoo ---------------------------------------------------


@dataclass
class LambConfig(fused.FusedConfig):
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6

    def validate(self) -> None:
        super().validate()
        checks.betas(self)
        checks.positive(self, "eps")


def lamb_stats(ctx: StatsContext, out: Reducer) -> None:
    """LAMB's trust ratios ||p|| / ||r||, one per tensor, exactly as this step used them: r is rebuilt from
    the updated m and v and the parameter before the step (norms summed over shards before the ratio).

    trust_ratio/min|median|max|mean  over tensors (exact, not binned). The ratio turns lr into a step
    relative to each tensor's norm (||update|| = lr * ||p||), so it is large for tensors whose Adam
    direction is small relative to their weights (often norms and biases) and small for fast-moving
    ones. A max far above the median: one tensor takes much larger steps in Adam units than the rest;
    ratios that shrink towards 0 over training: the weights stopped growing while Adam's r did not.
    """
    params, ms = ctx.state("exp_avg")
    for k, (p, i, m) in enumerate(zip(params, ctx.positions(params), ms, strict=True)):
        group, state = ctx.group_of(p), ctx.optimizer.state[p]
        (beta1, beta2), t, before = group["betas"], local(state["step"]), ctx.before[i].float()
        denom = local(state["exp_avg_sq"]).sqrt() / (1 - beta2**t).sqrt() + group["eps"]
        r = local(m) / (1 - beta1**t) / denom + group["weight_decay"] * before
        out.add_sum(f"_sq/p/{k}", before.square().sum())
        out.add_sum(f"_sq/r/{k}", r.square().sum())

    def ratios(v: dict) -> list[float]:
        pairs = [(v[f"_sq/p/{k}"], v[f"_sq/r/{k}"]) for k in range(len(params))]
        return [(a / b) ** 0.5 if a > 0 and b > 0 else 1.0 for a, b in pairs]

    out.spread_of("trust_ratio", ratios)
    out.derive("trust_ratio/mean", lambda v: sum(ratios(v)) / max(len(params), 1))


@register(
    "lamb", LambConfig, per_param(8), fsdp=VERIFIED, stats=lamb_stats,
    search_space={"optimizer.lr": "tag(log, interval(1e-3, 1e-1))", "optimizer.weight_decay": "interval(0.0, 0.1)",
                  "optimizer.betas.1": "interval(0.95, 0.999)"},
)  # fmt: skip
def _build(model: torch.nn.Module, cfg: LambConfig, ctx: BuildContext) -> Lamb:
    return Lamb(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
        fused=fused.resolve(cfg, model.parameters(), ctx, "lamb"),
    )  # fmt: skip
