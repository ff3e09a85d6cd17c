"""Per-layer statistics and the optimizer's own, every `trainer.stats_interval` steps.

On a stats step the loop hands a `StatsProbe` to `train_step`, which calls `before_step` after the
gradients are final (reduced, unscaled, clipped) and `after_step` right after the optimizer step. The
probe snapshots the parameters, so it sees the update the step actually made, and computes on the device:

  grad/norm/<layer>, param/norm/<layer>, update/norm/<layer>   L2 norms over the layer's parameters
  update/ratio_log10/<layer>                                   log10(update norm / param norm)

for each layer (`block_03.attn`, `block_03.mlp`, `block_03.norm`, `embedding`, `final.norm`, `head`),
for each kind summed over blocks (`attn`, `mlp`, `norm`, ...), and for the whole model (no suffix),
plus the optimizer family's statistics under `opt/` (defined next to each optimizer, see optim/stats.py).
Under FSDP, where each rank holds shards, everything is summed over ranks before square roots and
ratios, so the figures describe the whole model (under DDP each rank holds all of it). The host reads
them once per stats step, which is always a log step.
"""

from __future__ import annotations

import math
import re

import torch
import torch.distributed as dist

from optim.stats import Reducer, StatsContext, local

BLOCK = re.compile(r"(?:^|\.)h\.(\d+)\.(attn\.[qk]_norm|attn|mlp|ln_\d)\.")  # QK-norm weights are norms
WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "module.")  # activation ckpt, compile, DDP


def layer_of(name: str) -> tuple[str, str]:
    """(layer, kind) of a parameter name: ("block_03.attn", "attn"), ("embedding", "embedding"), ..."""
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    m = BLOCK.search(name)
    if m:
        kind = "norm" if m.group(2).startswith("ln_") or m.group(2).endswith("_norm") else m.group(2)
        return f"block_{int(m.group(1)):02d}.{kind}", kind
    if name.startswith(("wte.", "wpe.")):
        return "embedding", "embedding"
    if name.startswith("ln_f."):
        return "final.norm", "norm"
    if name.startswith("lm_head."):
        return "head", "head"
    return "other", "other"


REDUCE_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


def all_reduce():
    """A `reduce(tensor, op)` for Reducer.finish over the default process group (None without one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"

    def reduce(t: torch.Tensor, op: str) -> torch.Tensor:
        t = t.to(device, copy=True)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, REDUCE_OPS[op]))
        return t

    return reduce


class StatsProbe:
    """Collects one step's statistics (see the module docstring); `result()` gives {key: float}."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, family_stats=None,
                 previous_update: bool = False):  # fmt: skip
        self.optimizer = optimizer
        self.family_stats = family_stats  # fn(StatsContext, Reducer) from the optimizer's registration
        self.previous_update = previous_update  # the family compares with the step before: watch it too
        self.memory: dict = {}
        self._previous: list[torch.Tensor] | None = None
        self.full = True  # False: only record this step's update for the next (full) step
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.layers = [layer_of(n) for n, _ in named]
        self._before: list[torch.Tensor] | None = None
        self._reducer: Reducer | None = None

    def before_step(self) -> None:
        self._before = [local(p).detach().clone() for p in self.params]
        # copies: some optimizers change p.grad in place during the step (Nesterov SGD, schedule-free)
        self._grads = [p.grad.detach().clone() if p.grad is not None else None for p in self.params]

    @torch.no_grad()
    def after_step(self) -> None:
        after = [local(p).detach() for p in self.params]
        updates = torch._foreach_sub(after, self._before)
        if not self.full:
            self._previous, self._before, self._grads = updates, None, None
            return
        grads = [local(g) if g is not None else torch.zeros_like(a) for g, a in zip(self._grads, after, strict=True)]
        out = Reducer()
        sq = {  # per parameter, this rank's sum of squares
            "grad": torch.stack(torch._foreach_norm(grads)) ** 2,
            "param": torch.stack(torch._foreach_norm(self._before)) ** 2,
            "update": torch.stack(torch._foreach_norm(updates)) ** 2,
        }
        groups = self._groups()
        for what, values in sq.items():
            for group, index in groups.items():
                out.add_sum(f"_sq/{what}/{group}", values[index].sum())
        for group in groups:
            suffix = f"/{group}" if group else ""
            for what in ("grad", "param", "update"):
                out.derive(f"{what}/norm{suffix}", lambda v, k=f"_sq/{what}/{group}": math.sqrt(v[k]))
            out.derive(f"update/ratio_log10{suffix}", lambda v, g=group: _log10_ratio(v, g))
        if self.family_stats is not None:
            ctx = StatsContext(self.optimizer, self.params, self._grads, updates, self._before,
                               self._previous, self.memory)  # fmt: skip
            self.family_stats(ctx, out.scoped("opt/"))
        # this step's update is the next one's previous update, if the next step is watched (interval 1)
        self._reducer, self._before, self._grads = out, None, None
        self._previous = updates if self.previous_update else None

    @property
    def ready(self) -> bool:
        """A full step was watched (a step the anomaly guard skipped leaves nothing to report)."""
        return self._reducer is not None

    def wants(self, step: int, interval: int) -> bool:
        """Whether the coming optimizer step `step` (1-based) is watched; sets full or record-only mode."""
        self.full = step % interval == 0
        watched = self.full or (self.previous_update and (step + 1) % interval == 0)
        if not watched:
            self._previous = None  # the kept update is not this step's predecessor any more
        return watched

    def _groups(self) -> dict[str, torch.Tensor]:
        """Parameter indices by layer, by kind, and "" for the whole model."""
        groups: dict[str, list[int]] = {"": list(range(len(self.params)))}
        for i, (layer, kind) in enumerate(self.layers):
            groups.setdefault(layer, []).append(i)
            if layer != kind:
                groups.setdefault(kind, []).append(i)
        device = self._before[0].device if self._before else "cpu"
        return {g: torch.tensor(ix, device=device) for g, ix in groups.items()}

    def result(self) -> dict:
        """Reduce over ranks and read on the host (a collective under FSDP: every rank calls it)."""
        # Each FSDP rank holds a shard: add the ranks' sums. Under DDP every rank holds the whole model.
        sharded = any(hasattr(p, "to_local") for p in self.params)
        values = self._reducer.finish(all_reduce() if sharded else None)
        self._reducer = None
        return {k: v for k, v in values.items() if not k.startswith("_")}

    def ratios_by_layer(self, values: dict) -> list[float]:
        """The per-layer update/param log10 ratios (for a histogram across layers)."""
        return [v for k, v in values.items() if k.startswith("update/ratio_log10/block_") and math.isfinite(v)]


def _log10_ratio(v: dict, group: str) -> float:
    update, param = v[f"_sq/update/{group}"], v[f"_sq/param/{group}"]
    if update <= 0 or param <= 0:
        return float("-inf") if update <= 0 < param else float("nan")
    return 0.5 * math.log10(update / param)
