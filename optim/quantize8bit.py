"""Block-wise dynamic 8-bit quantisation (Dettmers et al. 2022), as bitsandbytes does it: the signed and
unsigned dynamic maps, nearest-code (or bitsandbytes-CPU) rounding thresholds, and quantise /
dequantise of flat tensors in blocks with one float32 absmax each. Used by optim/adamw8bit.py, whose
docstring describes the scheme and how it relates to bitsandbytes.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import torch
from torch import Tensor

ROUNDINGS = ("nearest", "bnb_cpu")

# --------------------------------------------------------------------------------------------------
# Quantisation maps and rounding thresholds
# --------------------------------------------------------------------------------------------------


def create_dynamic_map(signed: bool = True) -> Tensor:
    """The 8-bit dynamic map of Dettmers (2016), as bitsandbytes builds it (256 sorted float32).

    Seven decades 10^-6 .. 10^0; decade k (k = 0 for 10^-6) holds the centres of 2^k equal bins over
    [0.1, 1] (2^(k+1) for the unsigned map), scaled by the decade and mirrored for the signed map;
    then 0 and 1. Everything is computed in float32 in the same order as bitsandbytes, so the values
    are bit-identical.
    """
    values: list[float] = []
    for k in range(7):
        n_bins = 2**k if signed else 2 ** (k + 1)
        edges = torch.linspace(0.1, 1, n_bins + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (k - 6)
        values += (scale * centres).tolist()
        if signed:
            values += (-scale * centres).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


SIGNED_MAP = create_dynamic_map(signed=True)
UNSIGNED_MAP = create_dynamic_map(signed=False)


def _f32_key(x: Tensor) -> Tensor:
    """float32 -> int64 whose order is the float order (-0.0 just below +0.0)."""
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1)


def _key_f32(key: Tensor) -> Tensor:
    bits = torch.where(key >= 0, key, (-key - 1) | 0x80000000)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)
    return bits.to(torch.int32).view(torch.float32)


def _bnb_cpu_code(v: Tensor, grid_codes: Tensor) -> Tensor:
    """bitsandbytes 0.50.2's CPU rounding of normalised values v (float32), element by element."""
    t = (v.clamp(-1.0, 1.0) + 1.0) * 0.5
    # fmaf(t, 65535, 0.5): t * 65535 + 0.5 is exact in float64 whenever it can matter, so rounding
    # that once to float32 is the fused multiply-add's result.
    e = (t.double() * 65535.0 + 0.5).float()
    return grid_codes[e.trunc().long()]


@cache
def quantize_thresholds(signed: bool, rounding: str) -> Tensor:
    """The 255 sorted float32 thresholds T of a rounding rule: code(v) = #{j : T_j <= v}.

    nearest: T_j is the float just above the float32 midpoint of codes j and j+1.
    bnb_cpu: bitsandbytes' CPU rule; each T_j is found by bisection over the float32 values in
    [-1, 1], evaluating that rule exactly (it is monotone in v).
    """
    code = SIGNED_MAP if signed else UNSIGNED_MAP
    midpoints = (code[:-1] + code[1:]) * 0.5
    if rounding == "nearest":
        return torch.nextafter(midpoints, torch.tensor(math.inf))
    if rounding != "bnb_cpu":
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}.")
    # bitsandbytes' grid: point i is 2i / 65535 - 1 (float32), and its code is the number of
    # midpoints strictly below it.
    i = torch.arange(65536, dtype=torch.float32)
    grid = (i + i) / 65535.0 - 1.0
    grid_codes = torch.searchsorted(midpoints, grid, side="left")
    target = torch.arange(1, 256)
    lo = _f32_key(torch.full((255,), -1.0))  # code(-1) = 0 < every target
    hi = _f32_key(torch.full((255,), 1.0))  # code(1) = 255 >= every target
    assert bool((_bnb_cpu_code(_key_f32(lo), grid_codes) == 0).all())
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        reached = _bnb_cpu_code(_key_f32(mid), grid_codes) >= target
        hi = torch.where(reached, mid, hi)
        lo = torch.where(reached, lo, mid)
    return _key_f32(hi)


# The bucket of a float32 is its top 16 bits (sign, exponent, 7 mantissa bits): a relative width of at
# most 2^-7 ~ 0.8%, while in every region of the maps neighbouring codes are further apart than the
# buckets there are wide, so a bucket never holds two distinct thresholds (asserted in _lookup_tables).
_NUM_BUCKETS = 1 << 16


def _bucket(v: Tensor) -> Tensor:
    """int32 bucket numbers (top 16 bits of the float32, unsigned) of a flat float32 tensor."""
    return torch.bitwise_right_shift(v.view(torch.int32), 16).bitwise_and_(0xFFFF)


class _Tables:
    """Per-bucket lookup tables of one (map, rounding) on one device."""

    def __init__(self, code: Tensor, thr: Tensor, low: Tensor, jump: Tensor | None):
        self.code = code  # (256,) float32: the map, for dequantisation
        self.thr = thr  # (_NUM_BUCKETS,) float32: the one threshold inside the bucket, else +inf
        self.low = low  # (_NUM_BUCKETS,) uint8: the code below the threshold
        self.jump = jump  # (_NUM_BUCKETS,) uint8: code at/above the threshold minus low; None if all <= 1


@cache
def _lookup_tables(signed: bool, rounding: str, device: torch.device) -> _Tables:
    thresholds = quantize_thresholds(signed, rounding)
    first = torch.arange(_NUM_BUCKETS, dtype=torch.int64) << 16  # the bucket's bit patterns (uint32)
    last = first + 0xFFFF

    def as_f32(bits: Tensor) -> Tensor:
        return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)

    a, c = as_f32(first), as_f32(last)
    vmin, vmax = torch.minimum(a, c), torch.maximum(a, c)  # negative floats run backwards
    finite = torch.isfinite(a)  # a bucket shares one exponent: all finite, or all inf/NaN
    below = torch.searchsorted(thresholds, vmin, right=True)  # code at the bucket's smallest value
    above = torch.searchsorted(thresholds, vmax, right=True)  # code at its largest
    inside = (above > below) & finite
    t_first = thresholds[below.clamp(max=254)]
    t_last = thresholds[(above - 1).clamp(min=0)]
    assert bool((t_first == t_last)[inside].all()), "two thresholds share a bucket"
    thr = torch.where(inside, t_first, torch.tensor(math.inf))
    # NaN buckets: code 0. NaN is what an all-zero block normalises to (0 * (1/0)), and bitsandbytes
    # writes code 0 there. The -inf bucket also gets 0 and the +inf one 255 (its threshold is NaN,
    # so the comparison never adds to that), as bitsandbytes clamps to [-1, 1] first; infinities
    # come from a block whose absmax is so small (subnormal) that 1 / absmax overflows.
    low = torch.where(finite, below, 0)
    low[0x7F80] = 255
    thr[0x7F80] = math.nan
    low = low.to(torch.uint8)
    jump = torch.where(finite, above - below, 0).to(torch.uint8)
    code = SIGNED_MAP if signed else UNSIGNED_MAP
    # With "nearest" every threshold is a different value, so a bucket's code rises by at most 1
    # and code = low + (v >= thr); bitsandbytes' CPU grid skips codes, so it needs the jump table.
    jump_or_none = jump.to(device) if bool((jump > 1).any()) else None
    return _Tables(code.to(device), thr.to(device), low.to(device), jump_or_none)


# --------------------------------------------------------------------------------------------------
# Block-wise quantisation of a (blocks, block_size) float32 tensor
# --------------------------------------------------------------------------------------------------


def _quantize_blocks(x: Tensor, tables: _Tables, nonnegative: bool = False) -> tuple[Tensor, Tensor]:
    """x: (blocks, block_size) float32, contiguous -> (flat uint8 codes, (blocks,) float32 absmax)."""
    absmax = x.amax(dim=1)
    if not nonnegative:
        absmax = torch.maximum(absmax, x.amin(dim=1).neg_())
    v = (x * torch.reciprocal(absmax).unsqueeze(1)).view(-1)  # an all-zero block gives NaN
    idx = _bucket(v)
    above = torch.ge(v, tables.thr.index_select(0, idx)).view(torch.uint8)
    if tables.jump is not None:
        above = above.mul(tables.jump.index_select(0, idx))
    return tables.low.index_select(0, idx).add_(above), absmax


def _dequantize_blocks(codes: Tensor, absmax: Tensor, code: Tensor) -> Tensor:
    """Flat uint8 codes (a whole number of blocks) -> (blocks, block_size) float32."""
    x = code.index_select(0, codes.to(torch.int32)).view(absmax.numel(), -1)
    return x.mul_(absmax.unsqueeze(1))


def quantize_blockwise(
    x: Tensor, signed: bool = True, block_size: int = 256, rounding: str = "nearest"
) -> tuple[Tensor, Tensor]:
    """Quantise any float tensor block-wise: (uint8 codes shaped like x, float32 absmax per block).

    The counterpart of `bitsandbytes.functional.quantize_blockwise(x, code, blocksize=block_size)`
    with code = the signed (or unsigned) dynamic map.
    """
    _check_block_size(block_size)
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // block_size)
    padded = torch.zeros(blocks * block_size, dtype=torch.float32, device=x.device)
    padded[:n] = flat
    codes, absmax = _quantize_blocks(padded.view(blocks, block_size), _lookup_tables(signed, rounding, x.device))
    return codes[:n].view(x.shape), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, signed: bool = True, block_size: int = 256) -> Tensor:
    """Inverse of `quantize_blockwise`: float32 tensor shaped like `codes`."""
    n = codes.numel()
    padded = torch.zeros(absmax.numel() * block_size, dtype=torch.uint8, device=codes.device)
    padded[:n] = codes.reshape(-1)
    code = (SIGNED_MAP if signed else UNSIGNED_MAP).to(codes.device)
    return _dequantize_blocks(padded, absmax, code).view(-1)[:n].view(codes.shape)


def _check_block_size(block_size: Any) -> None:
    ok = isinstance(block_size, int) and not isinstance(block_size, bool) and block_size >= 1
    if not ok or block_size & (block_size - 1):
        raise ValueError(f"Invalid block_size {block_size!r}: it must be a positive power of two.")
