"""Muon's fused step (`optimizer=muon optimizer.fused=...`, optim/fused.py): torch.optim.Muon with the work
around its Newton-Schulz iteration compiled.

torch.optim.Muon (torch 2.13, torch/optim/_muon.py) steps each hidden matrix with

    buf <- lerp(buf, g, 1 - momentum)
    u   <- lerp(g, buf, momentum) if nesterov else buf          # then cast to bf16
    O   <- NewtonSchulz(u)                                      # ns_steps bf16 matmul iterations
    p   <- p * (1 - lr * wd) - adjusted_lr * O

where the elementwise lines are five separate passes (two lerps, the bf16 cast, the decay, the add).
`FusedMuon` computes the first two lines and the cast in one compiled kernel per matrix
(`_muon_momentum_kernel`: reads g and buf, writes buf and the bf16 u) and the last line in another
(`_muon_update_kernel`: reads p and O, writes p), and calls torch's own Newton-Schulz and lr adjustment in
between, so the result is torch's Muon bit for bit on a CPU (tests/test_fused_optimizers.py).

The Newton-Schulz iteration itself is matrix products, which are as fast as the BLAS makes them. Per
matrix of shape (a, b), a <= b, and per iteration: X X^T (2 a^2 b FLOPs), B = b A + c A^2 (2 a^3), B X
(2 a^2 b); so 5 iterations cost 5 (4 a^2 b + 2 a^3) (`newton_schulz_flops`). On GPT-2 124M that is 1.52
TFLOP per step over its 48 block matrices, against the model's 0.855 GFLOP per token (forward and
backward, `MiniGPT.flops_per_token` at 1024 positions): 21.7% of a step of 8 x 1024 tokens, 1.36% of
+experiment=gpt2_124m's 131,072 and 0.34% of +experiment=gpt2_124m_muon's 524,288. That fraction is
inherent to Muon; on a CPU its matmuls dominate the step (docs/optimizers.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from optim import fused


def _muon_momentum_kernel(g, buf, interp, momentum, nesterov: bool):
    """buf.lerp_(g, 1 - momentum); the update (Nesterov: g.lerp(buf, momentum)) in bf16, as NS takes it."""
    buf_new = fused.lerp(buf, g, interp)
    buf.copy_(buf_new)
    update = fused.lerp(g, buf_new, momentum) if nesterov else buf_new
    return update.to(torch.bfloat16)


def _muon_update_kernel(p, ortho, decay, step):
    """p.mul_(1 - lr * wd); p.add_(ortho, alpha=-adjusted_lr), ortho in bf16 (maybe a transposed view)."""
    p.copy_(fused.add_scaled(p * decay, ortho.to(p.dtype), step))


_MOMENTUM = fused.Kernel(_muon_momentum_kernel)
_UPDATE = fused.Kernel(_muon_update_kernel)


class FusedMuon(torch.optim.Muon):
    """torch.optim.Muon with compiled elementwise work around Newton-Schulz (module docstring)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            lr, momentum = group["lr"], group["momentum"]
            interp, weight, decay = fused.scalars(1 - momentum, momentum, 1 - lr * group["weight_decay"])
            for p, g, buf in zip(params, grads, bufs, strict=True):
                if fused.fusable(p, g, buf):
                    update = _MOMENTUM(fused.flat(g), fused.flat(buf), interp, weight, group["nesterov"]).view(g.shape)
                else:  # torch's own lines
                    buf.lerp_(g, 1 - momentum)
                    update = g.lerp(buf, momentum) if group["nesterov"] else buf
                ortho = _zeropower_via_newtonschulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                step = -_adjust_lr(lr, group["adjust_lr_fn"], p.shape)
                if p.is_contiguous() and p.dtype == torch.float32 and p.numel() >= 2:
                    _UPDATE(p, ortho, decay, *fused.scalars(step))
                else:
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(ortho, alpha=step)
        return loss


def newton_schulz_flops(matrices: list[nn.Parameter], ns_steps: int = 5) -> float:
    """FLOPs of one Muon step's Newton-Schulz iterations over `matrices` (the module docstring's count)."""
    total = 0.0
    for p in matrices:
        a, b = sorted(p.shape)
        total += ns_steps * (4 * a * a * b + 2 * a**3)
    return total
