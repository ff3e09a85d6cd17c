"""8-bit AdamW's fused step (optimizer.fused, optim/fused.py): one compiled kernel per parameter that
dequantises both moments, updates them and the parameter, and re-quantises, rounded as ATen rounds the eager
step (optim/adamw8bit.py, whose docstring gives the algorithm and the tolerance). Like optim/muon_fused.py, the
compiled half of an optimizer, kept apart from its eager half and its registration."""

from __future__ import annotations

import functools
import math

import torch

from optim import fused
from optim.quantize8bit import _Tables


def _quantize(x, absmax, thr, low, jump):
    """_quantize_blocks's codes for (blocks, block) x and its absmax, in a kernel."""
    v = (x * torch.reciprocal(absmax).unsqueeze(1)).view(-1)
    bucket = torch.bitwise_right_shift(v.view(torch.int32), 16).bitwise_and(0xFFFF)
    above = (v >= thr[bucket]).to(torch.uint8)
    if jump is not None:
        above = above * jump[bucket]
    return low[bucket] + above


def _adamw8bit_kernel(block: int, p, g, m_codes, v_codes, m_absmax, v_absmax, m_code, m_thr, m_low, m_jump, v_code,
                      v_thr, v_low, v_jump, beta1, one_minus_beta1, beta2, one_minus_beta2, correction2, eps, decay,
                      step):  # fmt: skip
    """`_update_8bit` for one parameter (p, g flat; codes padded to whole blocks), rounded as ATen rounds it."""
    n, blocks = p.shape[0], m_absmax.shape[0]
    g = torch.nn.functional.pad(g, (0, blocks * block - n)).view(blocks, block)
    m = m_code[m_codes.to(torch.int32)].view(blocks, block) * m_absmax.unsqueeze(1)
    v = v_code[v_codes.to(torch.int32)].view(blocks, block) * v_absmax.unsqueeze(1)
    m = fused.add_scaled(m * beta1, g, one_minus_beta1)
    v = fused.addcmul(v * beta2, g, g, one_minus_beta2)
    denom = v.sqrt() / correction2 + eps
    p.copy_(fused.addcdiv(p * decay, m.view(-1)[:n], denom.view(-1)[:n], step))
    new_m_absmax = torch.maximum(m.amax(dim=1), m.amin(dim=1).neg())
    new_v_absmax = v.amax(dim=1)
    m_codes.copy_(_quantize(m, new_m_absmax, m_thr, m_low, m_jump))
    v_codes.copy_(_quantize(v, new_v_absmax, v_thr, v_low, v_jump))
    m_absmax.copy_(new_m_absmax)
    v_absmax.copy_(new_v_absmax)


@functools.cache
def _kernel(block: int) -> fused.Kernel:
    """The kernel for one block size (a constant of the compiled loop)."""
    kernel = functools.partial(_adamw8bit_kernel, block)
    kernel.__name__ = f"adamw8bit_{block}"
    # Codes index a 256-entry map and buckets a 65536-entry table: in range by construction, so no checks.
    return fused.Kernel(kernel, assert_indirect_indexing=False)


def update_8bit_fused(items: list, block: int, signed: _Tables, unsigned: _Tables, *, step: int, lr: float,
                       beta1: float, beta2: float, eps: float, weight_decay: float) -> list:  # fmt: skip
    """The compiled kernel for every item (optim.adamw8bit._Item) it takes (float32, contiguous, updated in
    place); returns the others, for the eager step."""
    correction1 = 1.0 - beta1**step
    args = fused.scalars(beta1, 1.0 - beta1, beta2, 1.0 - beta2, math.sqrt(1.0 - beta2**step), eps,
                         1.0 - lr * weight_decay if weight_decay > 0.0 else 1.0, -lr / correction1)  # fmt: skip
    tables = (signed.code, signed.thr, signed.low, signed.jump)
    tables += (unsigned.code, unsigned.thr, unsigned.low, unsigned.jump)
    kernel, rest = _kernel(block), []
    for item in items:
        st = item.state
        if not (item.direct and item.flat.data_ptr() == item.param.data_ptr() and fused.fusable(item.flat, item.grad)):
            rest.append(item)
            continue
        kernel(fused.flat(item.flat), fused.flat(item.grad), st["exp_avg_codes"], st["exp_avg_sq_codes"],
               st["exp_avg_absmax"], st["exp_avg_sq_absmax"], *tables, *args)  # fmt: skip
    return rest
