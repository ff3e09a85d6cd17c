"""AdamW with 8-bit block-wise quantised moments.

Dettmers, Lewis, Shleifer and Zettlemoyer 2022, "8-bit Optimizers via Block-wise Quantization"
(ICLR 2022, arXiv:2110.02861), applied to AdamW (Loshchilov and Hutter 2019, "Decoupled Weight Decay
Regularization", arXiv:1711.05101; Adam: Kingma and Ba 2015, arXiv:1412.6980).

The algorithm
-------------
AdamW keeps two moments per parameter, m (mean of g) and v (mean of g^2). Here each is stored as one
uint8 code per element plus one float32 absmax per block of `block_size` consecutive elements (of the
flattened parameter; the last block of a parameter may be partial). A code indexes a 256-entry
*dynamic* quantisation map (Dettmers 2016, "8-Bit Approximations for Parallelism in Deep Learning",
arXiv:1511.04561): values in [-1, 1] spread over seven decades, 10^-6 .. 1, with more codes in the
upper decades, so that small moments keep relative precision. m uses the signed map and v (never
negative) the unsigned one, which spends the sign bit on one more fraction bit. Per step, for a
parameter p with gradient g and step count t:

    m = code1[m_codes] * m_absmax      # dequantise (per block: map value times the block's absmax)
    v = code2[v_codes] * v_absmax
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p * (1 - lr * wd)                                     # decoupled weight decay (if wd > 0)
    p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    m_absmax = max |m| per block;  m_codes = nearest code of m / m_absmax   (same for v)

All arithmetic is float32 (for bf16/fp16 parameters too, which are staged through float32). A block
whose values are all zero gets absmax 0 and code 0. Parameters with fewer than `min_8bit_size`
elements (biases, norm gains) keep float32 moments and take the float32 update exactly as
bitsandbytes writes it: p = p * (1 - lr * wd), then p = p + (-lr * sqrt(1 - beta2^t) / (1 - beta1^t))
* m / (sqrt(v) + eps * sqrt(1 - beta2^t)) (the same maths, rounded differently).

Relation to bitsandbytes
------------------------
The reference is `bitsandbytes.optim.AdamW8bit` (bitsandbytes 0.50.2: `Optimizer2State` with
optim_bits=8; on CPU its update is `backends/cpu/ops.py:_optimizer_update_8bit_blockwise_cpu` and the C
quantiser `quantize_cpu`). What is the same: the two maps (`create_dynamic_map` in
optim/quantize8bit.py, tested equal to `bitsandbytes.functional.create_dynamic_map`), the block size
(bitsandbytes hard-codes 256; here 256 is the default), the `min_8bit_size` rule, the per-step order of
operations (the same sequence of torch ops with the same Python-float scalars, so each element rounds
identically), the bias correction and where eps enters, the normalisation x * (1 / absmax), and the
state: uint8 codes plus a float32 absmax per block.

Rounding to a code. `rounding="nearest"` (the default) picks the code nearest to x / absmax, with the
float32 midpoint of two neighbouring codes as the boundary (a value exactly on it goes to the lower
code); this is what the paper describes and what bitsandbytes' CUDA kernels do (a binary search, then
a comparison with the midpoint). bitsandbytes' CPU quantiser in 0.50.2 does not: it clamps
v = x / absmax to [-1, 1], snaps it to a grid of 65536 points (index trunc(fmaf((v + 1) / 2, 65535,
0.5))) and returns the code nearest to that grid point. The grid step, 2 / 65535 ~ 3.05e-5, is far
coarser than the map near zero, so on CPU every |v| below ~1.5e-5 collapses onto one code (an exact 0
becomes 2.1e-5 * absmax for m and 1.6e-5 * absmax for v), 7 signed and 10 unsigned codes are never
used, and 0.1-0.2% of other values round to the second-nearest code. `rounding="bnb_cpu"` reproduces
that rule bit for bit, so that the tests can show agreement with bitsandbytes on CPU to the last bit.

Both rules are a monotone step function of v with 255 steps, i.e. a table of 255 float32 thresholds T
(code = #{j : T_j <= v}; `quantize_thresholds`). The hot path does not search T (torch.searchsorted
is slow on CPU): a float32's top 16 bits (sign, exponent, 7 mantissa bits) name its bucket, no bucket
holds two distinct thresholds (checked when the tables are built), so code = low[bucket] +
(v >= threshold[bucket]) * jump[bucket] (jump is 1, and skipped, for "nearest"). That is plain torch
(a shift, two index_selects, a comparison) and gives the same codes on CPU and CUDA.

Differences from bitsandbytes that do not change the numbers: the codes are stored flat and padded
to whole blocks (`exp_avg_codes`, `exp_avg_sq_codes`, with `exp_avg_absmax`, `exp_avg_sq_absmax`;
float32 moments are `exp_avg`, `exp_avg_sq`; the step is a float32 CPU tensor, as in torch.optim);
the update runs on all 8-bit parameters of a param group at once, concatenated into chunks of whole
blocks (at most `chunk_numel` elements, which bounds the float32 temporaries), with multi-tensor
`torch._foreach_*` ops for the parameters and the float32 moments; hyperparameters are validated
with ValueError; `load_state_dict` keeps the codes uint8 and the absmax and float32 moments float32
(torch's default would cast them to the parameter dtype). Not implemented: paging, percentile
clipping, max_unorm, the AdEMAMix/LAMB variants, per-parameter config overrides.

Speed (one CPU thread, GPT-2-small-sized parameters, 124M): ~1.25 s per step, against 2.4-3.4 s for
bitsandbytes' CPU AdamW8bit and ~0.14 s for torch's fused float32 AdamW; the update is ~30 passes of
torch ops over the moments where a fused kernel makes one.

Fused step (`fused=True`, optim/fused.py; the kernel is in optim/adamw8bit_fused.py): for each 8-bit
parameter, one kernel (compiled once per block size) dequantises, updates and requantises its moments and
updates the parameter in one pass over the blocks, reading the gradient, the parameter and two code arrays
and writing those two and the parameter (about 15 bytes per element against fused AdamW's 28). Its codes
and absmax are bit-identical to the eager step's on a CPU, and so is the update except for the square
root: torch's eager CPU sqrt is not correctly rounded (1 ulp off on ~0.7% of elements) and the compiled
one is, so a parameter can differ by a float32 ulp per step. Tensors under min_8bit_size keep the eager
float32 update. On a CPU the compiled kernel is slower than the eager chunked step on one thread (1.3-1.9x
its time on GPT-2 shapes, measured) and about as fast on two quiet ones (1653 against 1702 ms,
bench_optimizers.py): each element takes six table lookups (two dequantisations, two bucket tables per
moment), which Inductor's C++ backend emits as scalar gathers through a staging buffer, where the eager
step's index_select and cache-sized chunks do better. So `fused=auto` keeps the eager step on a CPU; the
kernel is for devices whose compiler gathers natively (Triton on CUDA), and `fused=true` forces it. """

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from optim import checks, fused
from optim.adamw8bit_fused import update_8bit_fused
from optim.builder import BuildContext, param_groups, refused, register
from optim.checks import check_hparams
from optim.quantize8bit import (
    ROUNDINGS,
    _check_block_size,
    _dequantize_blocks,
    _lookup_tables,
    _quantize_blocks,
    _Tables,
)
from optim.stats import Reducer, StatsContext, local
from optim.torch_optimizers import adam_moment_stats

__all__ = ["AdamW8bit"]

# --------------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------------


def _check_hparams(**h: Any) -> None:
    """ValueError, in one sentence, for the first bad hyperparameter among those given."""
    check_hparams(**h)
    if "block_size" in h:
        _check_block_size(h["block_size"])
    if "min_8bit_size" in h:
        m = h["min_8bit_size"]
        if not (isinstance(m, int) and not isinstance(m, bool) and m >= 0):
            raise ValueError(f"Invalid min_8bit_size {m!r}: it must be an integer >= 0.")
    if "rounding" in h and h["rounding"] not in ROUNDINGS:
        raise ValueError(f"Invalid rounding {h['rounding']!r}: expected one of {ROUNDINGS}.")


_HPARAMS = ("lr", "betas", "eps", "weight_decay", "block_size", "min_8bit_size", "rounding")


class _Item:
    """One parameter taking the 8-bit update this step."""

    __slots__ = ("param", "state", "n", "blocks", "flat", "grad", "direct")

    def __init__(self, param: Tensor, state: dict):
        self.param = param
        self.state = state
        self.n = param.numel()
        self.blocks = state["exp_avg_absmax"].numel()
        # The parameter, flat: a view (a copy, written back at the end, if it is not contiguous).
        # float32 pieces are updated in place; other dtypes go through float32 piece by piece.
        self.flat = param.detach().view(-1) if param.is_contiguous() else param.detach().contiguous().view(-1)
        self.direct = param.dtype == torch.float32
        self.grad = param.grad.reshape(-1)

    def finish(self) -> None:
        if self.flat.data_ptr() != self.param.data_ptr():
            self.param.detach().copy_(self.flat.view(self.param.shape))


def _fp32_flat(param: Tensor) -> Tensor:
    """A flat float32 view of the parameter, or a staging copy (bf16/fp16 or non-contiguous)."""
    if param.dtype == torch.float32 and param.is_contiguous():
        return param.detach().view(-1)
    return param.detach().reshape(-1).to(torch.float32, copy=True)


def _cat(parts: list[Tensor]) -> Tensor:
    """torch.cat, without the copy when there is one part (the chunk only reads its inputs)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _write_back(param: Tensor, flat: Tensor) -> None:
    if flat.data_ptr() != param.data_ptr():
        param.detach().copy_(flat.view(param.shape))


class AdamW8bit(Optimizer):
    """AdamW with block-wise 8-bit moments (Dettmers et al. 2022). See the module docstring.

    Args:
        params: tensors or param-group dicts.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay).
        block_size: elements per quantisation block (a power of two; bitsandbytes uses 256).
        min_8bit_size: parameters with fewer elements keep float32 moments (bitsandbytes: 4096).
        rounding: "nearest" (the paper, bitsandbytes on CUDA) or "bnb_cpu" (bitsandbytes' CPU grid).
    """

    #: Most elements updated at once; bounds the temporaries (about 40 bytes per element). None: 2^18
    #: on CPU (cache-sized; measured fastest), 2^22 elsewhere (fewer kernel launches).
    chunk_numel: int | None = None

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        block_size: int = 256,
        min_8bit_size: int = 4096,
        *,
        rounding: str = "nearest",
        fused: bool = False,
    ):
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, eps=eps,
            weight_decay=weight_decay, block_size=block_size, min_8bit_size=min_8bit_size, rounding=rounding,
        )  # fmt: skip
        _check_hparams(**defaults)
        super().__init__(params, defaults)
        self.fused = fused  # the compiled step (not a group value: a checkpoint resumes either way)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _check_hparams(**{k: param_group[k] for k in _HPARAMS if k in param_group})
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("rounding", "nearest")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's loader, except that the state tensors keep their dtype (uint8 codes, float32
        absmax and moments); torch would cast every floating state tensor to the parameter dtype."""
        saved = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        exact: list[tuple[Tensor, dict[str, Tensor]]] = []
        for pid, p in zip(saved, params, strict=False):  # a mismatch fails in torch's loader
            s = state_dict["state"].get(pid)
            if s:
                exact.append((p, {k: v for k, v in s.items() if torch.is_tensor(v) and k != "step"}))
        super().load_state_dict(state_dict)
        for p, tensors in exact:
            for k, v in tensors.items():
                self.state[p][k] = v.to(device=p.device, copy=True)
            self.state[p]["step"] = self.state[p]["step"].detach().to("cpu", torch.float32, copy=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            small: dict[tuple, list[Tensor]] = {}
            large: dict[tuple, list[_Item]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients.")
                if p.is_complex():
                    raise RuntimeError("AdamW8bit does not support complex parameters.")
                state = self.state[p]
                if not state:
                    self._init_state(p, state, group)
                state["step"] += 1
                t = int(state["step"].item())
                if "exp_avg_codes" in state:
                    item = _Item(p, state)
                    block = state["exp_avg_codes"].numel() // item.blocks
                    large.setdefault((p.device, t, block), []).append(item)
                else:
                    small.setdefault((p.device, t), []).append(p)

            lr = float(group["lr"])
            beta1, beta2 = group["betas"]
            hp = dict(lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
            for (_, t), ps in small.items():
                self._update_fp32(ps, step=t, **hp)
            for (device, t, block), items in large.items():
                signed = _lookup_tables(True, group["rounding"], device)
                unsigned = _lookup_tables(False, group["rounding"], device)
                if self.fused:
                    items = update_8bit_fused(items, block, signed, unsigned, step=t, **hp)
                if items:
                    self._update_8bit(items, block, signed, unsigned, step=t, **hp)
        return loss

    def _init_state(self, p: Tensor, state: dict, group: dict) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32)
        n = p.numel()
        if n >= max(1, group["min_8bit_size"]):
            block = group["block_size"]
            blocks = -(-n // block)
            for name in ("exp_avg", "exp_avg_sq"):
                state[f"{name}_codes"] = torch.zeros(blocks * block, dtype=torch.uint8, device=p.device)
                state[f"{name}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)

    def _update_fp32(
        self, params: list[Tensor], *, step: int, lr: float, beta1: float, beta2: float, eps: float,
        weight_decay: float,
    ) -> None:  # fmt: skip
        """Float32 moments: bitsandbytes' 32-bit Adam update, as multi-tensor ops."""
        ps = [_fp32_flat(p).view(p.shape) for p in params]
        gs = [p.grad.float() for p in params]
        ms = [self.state[p]["exp_avg"] for p in params]
        vs = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, gs, alpha=1.0 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
        correction1 = 1.0 - beta1**step
        correction2 = math.sqrt(1.0 - beta2**step)
        step_size = -lr * correction2 / correction1
        if weight_decay > 0.0:
            torch._foreach_mul_(ps, 1.0 - lr * weight_decay)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, eps * correction2)
        torch._foreach_add_(ps, torch._foreach_div(ms, denom), alpha=step_size)
        for p, flat in zip(params, ps, strict=True):
            _write_back(p, flat)

    def _update_8bit(
        self, items: list[_Item], block: int, signed: _Tables, unsigned: _Tables, *, step: int, lr: float,
        beta1: float, beta2: float, eps: float, weight_decay: float,
    ) -> None:  # fmt: skip
        """8-bit moments: all items (same device, step and block size), chunk by chunk of blocks."""
        correction1 = 1.0 - beta1**step
        correction2 = math.sqrt(1.0 - beta2**step)
        chunk_numel = self.chunk_numel or (1 << 18 if items[0].param.device.type == "cpu" else 1 << 22)
        max_blocks = max(1, chunk_numel // block)
        chunks: list[list[tuple[_Item, int, int]]] = [[]]
        room = max_blocks
        for item in items:
            b0 = 0
            while b0 < item.blocks:
                take = min(item.blocks - b0, room)
                chunks[-1].append((item, b0, b0 + take))
                b0 += take
                room -= take
                if room == 0:
                    chunks.append([])
                    room = max_blocks
        zeros = torch.zeros(block, dtype=torch.float32, device=items[0].param.device)

        for pieces in chunks:
            if not pieces:
                continue
            sts = [(it.state, b0, b1) for it, b0, b1 in pieces]
            m_codes = _cat([s["exp_avg_codes"][b0 * block : b1 * block] for s, b0, b1 in sts])
            v_codes = _cat([s["exp_avg_sq_codes"][b0 * block : b1 * block] for s, b0, b1 in sts])
            m_absmax = _cat([s["exp_avg_absmax"][b0:b1] for s, b0, b1 in sts])
            v_absmax = _cat([s["exp_avg_sq_absmax"][b0:b1] for s, b0, b1 in sts])
            g_parts, p_views, spans, staged_to, staged = [], [], [], [], []
            offset = 0
            for it, b0, b1 in pieces:
                start, stop = b0 * block, min(b1 * block, it.n)
                g_parts.append(it.grad[start:stop].float())  # .float(): no copy for float32
                if b1 * block > stop:
                    g_parts.append(zeros[: b1 * block - stop])  # pad the last, partial block
                piece = it.flat[start:stop]
                if not it.direct:
                    staged_to.append(piece)
                    piece = piece.float()
                    staged.append(piece)
                p_views.append(piece)
                spans.append((offset, stop - start))
                offset += (b1 - b0) * block
            g = _cat(g_parts)

            m = _dequantize_blocks(m_codes, m_absmax, signed.code).view(-1)
            v = _dequantize_blocks(v_codes, v_absmax, unsigned.code).view(-1)
            del m_codes, v_codes
            m.mul_(beta1).add_(g, alpha=1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            del g
            denom = v.sqrt().div_(correction2).add_(eps)
            if weight_decay > 0.0:
                torch._foreach_mul_(p_views, 1.0 - lr * weight_decay)
            torch._foreach_addcdiv_(
                p_views, [m[o : o + k] for o, k in spans], [denom[o : o + k] for o, k in spans], value=-lr / correction1
            )
            del denom
            if staged:
                torch._foreach_copy_(staged_to, staged)

            new_m_codes, new_m_absmax = _quantize_blocks(m.view(-1, block), signed)
            del m
            new_v_codes, new_v_absmax = _quantize_blocks(v.view(-1, block), unsigned, nonnegative=True)
            del v
            dst, src = [], []
            offset = 0
            for st, b0, b1 in sts:
                old = slice(b0 * block, b1 * block)
                new = slice(offset * block, (offset + b1 - b0) * block)
                dst += [st["exp_avg_codes"][old], st["exp_avg_sq_codes"][old]]
                src += [new_m_codes[new], new_v_codes[new]]
                dst += [st["exp_avg_absmax"][b0:b1], st["exp_avg_sq_absmax"][b0:b1]]
                src += [new_m_absmax[offset : offset + b1 - b0], new_v_absmax[offset : offset + b1 - b0]]
                offset += b1 - b0
            torch._foreach_copy_(dst, src)

        for item in items:
            item.finish()


# ---- registration in the trainer's optimizer zoo ---------------------------------------------------


@dataclass
class AdamW8bitConfig(fused.FusedConfig):
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    block_size: int = 256
    min_8bit_size: int = 4096

    def validate(self) -> None:
        super().validate()
        checks.betas(self)
        checks.positive(self, "eps")
        checks.require(self, "block_size", lambda v: v >= 2 and (v & (v - 1)) == 0, "a power of two >= 2")
        checks.non_negative(self, "min_8bit_size")


def _state_bytes(model: torch.nn.Module, cfg: AdamW8bitConfig) -> float:
    """Two uint8 codes per element (padded to whole blocks) and two fp32 scales per block; fp32 m and
    v for tensors under min_8bit_size."""
    total = 0
    for p in model.parameters():
        if p.numel() >= cfg.min_8bit_size:
            blocks = math.ceil(p.numel() / cfg.block_size)
            total += 2 * blocks * cfg.block_size + 2 * 4 * blocks
        else:
            total += 8 * p.numel()
    return total


_MOMENT = {"m": "exp_avg", "v": "exp_avg_sq"}


def adamw8bit_stats(ctx: StatsContext, out: Reducer) -> None:
    """`adam_stats` of the dequantised moments (m_norm, v_norm, v/..., step_size/...; the float32 moments of
    tensors under min_8bit_size as they are), and the quantisation error of the 8-bit state:

    quant_error_rel/m, quant_error_rel/v  ||x - dequant(quant(x))|| / ||x|| over all 8-bit tensors, for x
        the moment as the next step will compute it before storing it, with this step's gradient standing
        in for the next one (m: beta1 m + (1 - beta1) g, v: beta2 v + (1 - beta2) g^2), quantised with this
        optimizer's own map, rounding and blocks (the exact float32 moment of this step is gone after it).
        About 1e-2 for m and 7e-3 for v on the tests' tiny model; a rise means blocks whose absmax is far
        above most of their values (outliers), so the small values lose precision. nan: no tensor is 8-bit.
    """
    params = [p for p in ctx.params if ctx.optimizer.state.get(p)]
    ms, vs = [], []
    for name in ("err_m", "x_m", "err_v", "x_v"):
        out.add_sum(f"_sq/{name}", torch.zeros(()))
    for p, i in zip(params, ctx.positions(params), strict=True):
        state, group, n = ctx.optimizer.state[p], ctx.group_of(p), p.numel()
        if "exp_avg_codes" not in state:
            ms.append(state["exp_avg"])
            vs.append(state["exp_avg_sq"])
            continue
        (beta1, beta2), g = group["betas"], torch.zeros(state["exp_avg_codes"].numel(), device=p.device)
        g[:n] = local(ctx.grads[i]).reshape(-1).float()
        for key, signed, beta, g_term in (("m", True, beta1, g), ("v", False, beta2, g * g)):
            tables = _lookup_tables(signed, group["rounding"], p.device)
            stored = _dequantize_blocks(state[f"{_MOMENT[key]}_codes"], state[f"{_MOMENT[key]}_absmax"], tables.code)
            (ms if key == "m" else vs).append(stored.view(-1)[:n].view(p.shape))
            x = stored.mul(beta).add_(g_term.view(stored.shape), alpha=1 - beta)
            error = x - _dequantize_blocks(*_quantize_blocks(x, tables, nonnegative=not signed), tables.code)
            out.add_sum(f"_sq/err_{key}", error.square().sum())
            out.add_sum(f"_sq/x_{key}", x.square().sum())
    adam_moment_stats(ctx, out, params, ms, vs)
    for key in ("m", "v"):
        out.derive(f"quant_error_rel/{key}", lambda v, k=key: (v[f"_sq/err_{k}"] / v[f"_sq/x_{k}"]) ** 0.5
                   if v[f"_sq/x_{k}"] > 0 else float("nan"))  # fmt: skip


@register(
    "adamw8bit", AdamW8bitConfig, _state_bytes, stats=adamw8bit_stats,
    fsdp=refused("8-bit AdamW quantises flat blocks of whole tensors, and FSDP gives each rank a shard"),
    search_space={"optimizer.lr": "tag(log, interval(1e-4, 1e-2))", "optimizer.weight_decay": "interval(0.0, 0.3)",
                  "optimizer.betas.0": "interval(0.8, 0.95)", "optimizer.betas.1": "interval(0.9, 0.999)"},
)  # fmt: skip
def _build(model: torch.nn.Module, cfg: AdamW8bitConfig, ctx: BuildContext) -> AdamW8bit:
    return AdamW8bit(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
        block_size=cfg.block_size, min_8bit_size=cfg.min_8bit_size,
        fused=fused.resolve(cfg, model.parameters(), ctx, "adamw8bit", saved_s_per_param=0.0),
    )  # fmt: skip
