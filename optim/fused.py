"""Fused optimizer steps: `optimizer.fused=auto|true|false` for every hand-written optimizer.

Why. On a CPU, an optimizer written with multi-tensor `torch._foreach_*` ops makes one pass over memory
per op, and allocates a parameter-sized temporary for every op that is not in place (fresh memory,
page-faulted on every step), where torch's fused AdamW makes one pass over its 7 parameter-sized
arrays. The hand-written optimizers were 2.8-12.7x fused AdamW that way (docs/optimizers.md).

How. Each optimizer writes its update once more as a *kernel*: a function of one parameter's tensors
(flattened to 1-D) and a few scalars, which `torch.compile` (Inductor: C++/OpenMP on a CPU, Triton on
a GPU) turns into one loop over the elements, with no temporaries. The step calls it once per
parameter tensor. Choices made so that the compiled step is cheap to compile and never recompiles:

- one graph per kernel: every tensor is passed as a 1-D alias of its memory (`flat`), so 1-D, 2-D and
  3-D parameters share the graph, and sizes are symbolic (`dynamic=True`);
- every per-step number (lr, bias corrections, ...) is computed on the host in float64, as the eager
  step computes it, and passed as a 0-d float64 tensor (`scalars`): a scheduler changing the lr every
  step changes a value, not the graph (tests run with dynamo's error_on_recompile);
- the kernel reproduces the rounding of the eager step op for op. ATen's CPU kernels round a few ops
  as one fused multiply-add (lerp, add with alpha, addcmul), which Inductor emits only when asked, so
  kernels build those from `lerp`, `add_scaled` and `addcmul` below (Inductor's prims.fma). With them
  the compiled step is bit-identical to the eager one on a CPU for Lion, Sophia and Muon, and for LAMB
  but the last size % 16 elements of v (torch's fused Adam kernel rounds its tail in another order).
  Where a square root enters the update (AdaBelief, schedule-free AdamW, 8-bit AdamW), the compiled one
  is correctly rounded and torch's eager CPU sqrt is not (1 ulp off on ~0.7% of elements), so the
  weights differ by about a float32 ulp per step; tests/test_fused_optimizers.py holds each to its
  stated tolerance and runs the reference tests on both steps.

What stays eager: tensors the kernel does not take (not contiguous, not float32, fewer than 2 elements,
which dynamo would specialise on) go through the optimizer's eager function. Under FSDP the kernels run
on each rank's local shard (`local`): elementwise maths is the same on a shard.

`auto` compiles when it pays for itself: on a CPU with a C++ compiler, when the time the compiled step
saves over the run (per parameter per step, `SAVED_S_PER_PARAM`, measured) exceeds a cold compile
(`COLD_COMPILE_S`); the run length is `BuildContext.max_steps` (unknown: decided by the model size,
`LARGE_MODEL`). Elsewhere (CUDA, MPS) auto stays eager until the fused step is measured there
(`scripts/bench_optimizers.py --device cuda --fused true`). One log line says what was chosen and why.
The compile caches live in Inductor's cache directory (TORCHINDUCTOR_CACHE_DIR), so the next run on the
machine pays seconds, not the cold compile.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch._inductor.inductor_prims  # noqa: F401  (registers prims.fma, which the kernels use)
from torch import Tensor

from optim import checks
from optim.builder import BuildContext, OptimizerConfig

log = logging.getLogger(__name__)

CHOICES = ("auto", "true", "false")

# Measured with scripts/bench_optimizers.py on model=gpt2 (124M), CPU (docs/optimizers.md): about the
# smallest time per parameter per step that a compiled step saved over its eager one (LAMB's, 0.6 ns; the
# others save 2-10x more), and above the slowest cold compile of one optimizer's kernels (an empty
# Inductor cache, on a busy 2-core machine: 20-40 s).
SAVED_S_PER_PARAM = 0.5e-9
COLD_COMPILE_S = 60.0
LARGE_MODEL = 20_000_000  # parameters; with no run length, auto compiles from this size on


@dataclass
class FusedConfig(OptimizerConfig):
    """The config of an optimizer that has a fused step (its config class subclasses this)."""

    fused: str = "auto"  # auto | true | false: the compiled step (optim/fused.py)

    def validate(self) -> None:
        super().validate()
        self.fused = str(self.fused).lower()  # a YAML/command-line true arrives as the bool True
        checks.require(self, "fused", lambda v: v in CHOICES, "auto, true or false")


# ---- the choice -------------------------------------------------------------------------------------


def _has_cpp_compiler() -> bool:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
        return True
    except Exception:  # no compiler found, or an Inductor that cannot look: then eager is the safe choice
        return False


def _auto(numel: int, ctx: BuildContext, saved_s_per_param: float) -> tuple[bool, str]:
    device = ctx.device.type
    if device != "cpu":
        return False, f"auto: the compiled step is not measured on {device} yet (optimizer.fused=true tries it)"
    if saved_s_per_param <= 0:
        return False, "auto: on a CPU this optimizer's compiled step is not faster than its eager one (measured)"
    if not _has_cpp_compiler():
        return False, "auto: no C++ compiler for torch.compile on this machine"
    steps = ctx.max_steps
    if steps is None:
        big = numel >= LARGE_MODEL
        return big, (f"auto: run length unknown; {numel / 1e6:.1f}M parameters is "
                     f"{'at least' if big else 'under'} {LARGE_MODEL / 1e6:.0f}M")  # fmt: skip
    saved = steps * numel * saved_s_per_param
    pays = saved > COLD_COMPILE_S
    return pays, (f"auto: {numel / 1e6:.1f}M parameters x {steps} steps save ~{saved:.0f} s, "
                  f"{'more' if pays else 'less'} than a cold compile (~{COLD_COMPILE_S:.0f} s)")  # fmt: skip


def resolve(cfg: FusedConfig, params: Sequence[Tensor], ctx: BuildContext, name: str, *,
            saved_s_per_param: float = SAVED_S_PER_PARAM) -> bool:  # fmt: skip
    """Whether optimizer `name` takes its compiled step, from optimizer.fused; logs the choice and why.
    saved_s_per_param: what the compiled step saves per parameter per step on a CPU (0: auto never
    compiles there, the optimizer measured its compiled step slower)."""
    choice = str(cfg.fused).lower()
    numel = sum(p.numel() for p in params)
    if choice == "true":
        if ctx.device.type == "cpu" and not _has_cpp_compiler():
            raise ValueError("optimizer.fused=true needs a C++ compiler for torch.compile on a CPU (none found); "
                             "set optimizer.fused=false")  # fmt: skip
        fused, why = True, "optimizer.fused=true"
    elif choice == "false":
        fused, why = False, "optimizer.fused=false"
    else:
        fused, why = _auto(numel, ctx, saved_s_per_param)
    how = "compiled (one torch.compile kernel per tensor)" if fused else "eager (foreach ops)"
    log.info("optimizer=%s step: %s; %s", name, how, why)
    return fused


# ---- running kernels --------------------------------------------------------------------------------


class Kernel:
    """`fn(*tensors, *scalars)`, compiled on first use (one graph: 1-D tensors, symbolic sizes)."""

    def __init__(self, fn: Callable, **options):
        self.fn = fn
        self.options = options  # Inductor options for this kernel
        self.name = fn.__name__.strip("_").removesuffix("_kernel")
        self.compile_seconds: float | None = None  # the first call in this process: compile + one run

    @functools.cached_property
    def compiled(self) -> Callable:
        return torch.compile(self.fn, dynamic=True, fullgraph=True, options=self.options or None)

    def __call__(self, *args):
        if self.compile_seconds is not None:
            return self.compiled(*args)
        start = time.perf_counter()
        out = self.compiled(*args)
        self.compile_seconds = time.perf_counter() - start
        log.info("compiled the fused %s step in %.1f s", self.name, self.compile_seconds)
        return out


def local(t: Tensor) -> Tensor:
    """A DTensor's local shard (FSDP), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def shard_group(t: Tensor):
    """The process group over whose ranks a DTensor's shards sum to the whole (FSDP2: its 1-D mesh), or None
    for a plain tensor."""
    if not hasattr(t, "device_mesh"):
        return None
    from torch.distributed.tensor import Shard

    if t.device_mesh.ndim != 1 or not all(isinstance(pl, Shard) for pl in t.placements):
        raise NotImplementedError(f"a fused step over a DTensor placed {t.placements} on a {t.device_mesh.ndim}-D "
                                  "mesh; set optimizer.fused=false")  # fmt: skip
    return t.device_mesh.get_group()


def flat(t: Tensor) -> Tensor:
    """A 1-D alias of a contiguous tensor's memory that is not a view (so dynamo sees a plain 1-D input,
    whatever the shape of the tensor it aliases); writes land in the tensor."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),))


def fusable(*tensors: Tensor) -> bool:
    """Whether the kernels take these tensors as they are (else the eager function does)."""
    first = tensors[0]
    return first.numel() >= 2 and all(
        t.is_contiguous() and t.dtype == torch.float32 and t.device == first.device and t.numel() == first.numel()
        for t in tensors
    )


def scalars(*values: float) -> tuple[Tensor, ...]:
    """Per-step numbers as 0-d float64 CPU tensors: values change, the compiled graph does not."""
    return tuple(torch.tensor(float(v), dtype=torch.float64) for v in values)


def run(kernel: Kernel, eager: Callable[..., None], lists: Sequence[list[Tensor]], args: tuple[Tensor, ...],
        **eager_kwargs) -> None:  # fmt: skip
    """kernel(*flat tensors of one parameter, *args) for every parameter whose tensors it takes; the rest
    (together) through eager(*lists, **eager_kwargs), the optimizer's foreach function."""
    rest: list[list[Tensor]] = [[] for _ in lists]
    for item in zip(*lists, strict=True):
        shards = [local(t) for t in item]
        if fusable(*shards):
            kernel(*map(flat, shards), *args)
        else:
            for r, t in zip(rest, item, strict=True):
                r.append(t)
    if rest[0]:
        eager(*rest, **eager_kwargs)


# ---- ATen's CPU rounding, for kernels -----------------------------------------------------------------
# Inductor computes a * b + c with two roundings unless told otherwise; these are the forms whose
# rounding equals ATen's CPU kernels (checked bit for bit by tests/test_fused_optimizers.py).


def fma(a, b, c):
    """a * b + c, rounded once."""
    return torch.ops.prims.fma(a, b, c)


def lerp(start: Tensor, end: Tensor, weight: Tensor) -> Tensor:
    """torch.lerp(start, end, weight) for a scalar weight, as ATen computes it: fma(weight, end - start,
    start) for |weight| < 0.5, else fma(weight - 1, end - start, end)."""
    w = weight.to(start.dtype)  # ATen subtracts 1 in the tensor's precision
    high = w.abs() >= 0.5
    return fma(end - start, torch.where(high, w - 1, w), torch.where(high, end, start))


def add_scaled(a: Tensor, b: Tensor, alpha: Tensor) -> Tensor:
    """torch.add(a, b, alpha=alpha) (ATen: fma(b, alpha, a))."""
    return fma(b, alpha, a)


def addcmul(a: Tensor, b: Tensor, c: Tensor, value: Tensor) -> Tensor:
    """torch.addcmul(a, b, c, value=value) (ATen: fma(value * b, c, a))."""
    return fma(value * b, c, a)


def addcdiv(a: Tensor, b: Tensor, c: Tensor, value: Tensor) -> Tensor:
    """torch.addcdiv(a, b, c, value=value) (ATen: a + (value * b) / c)."""
    return a + (value * b) / c
