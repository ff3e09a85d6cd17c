"""The hyperparameters the benchmark tunes, each as a log-spaced grid around its default.

Which hyperparameters an optimizer has is its spec's fact (`search_space` in its `@register` under optim/);
the benchmark only decides how to walk them. Each becomes an Axis: a map from a grid position x (a real
number; x = 0 is the default, x +/- 1 one grid step either side) to a value:

    log     lr and other `tag(log, ...)` keys:       default * factor^x
    zero    weight decay, warmup, keys whose range starts at 0: default * factor^x, and exactly 0 at the
            bottom, `zero_steps` grid steps below the smallest value tried above it; a default of 0 starts
            there, with the range's upper end as the value at x = 0
    decay   betas, momentum (rates in [0, 1)): 1 - (1 - default) * factor^x, so the grid is log-spaced in
            1 - beta (0.95 -> 0.9 or 0.975), never reaching 1
    linear  anything else (e.g. Adafactor's beta2_decay): default + x * (range / 4), inside the range

A hard bound (0, a beta of 0, warmup over half the run, a linear range's end) ends the grid there.
The spec's `schedule.warmup_steps` becomes `warmup_fraction`: warmup as a fraction of each run's own
steps, so the schedule keeps its shape at every budget.
Order, as Wen et al. 2025 tune: the learning rates (the spec's lr_fields), weight decay, warmup, the betas or
momentum, then the rest.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

WARMUP = "warmup_fraction"
MAX_WARMUP = 0.5  # of a run's steps
_INTERVAL = re.compile(r"interval\(\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*\)")


@dataclass(frozen=True)
class Axis:
    key: str  # a dotted config key ("optimizer.lr", "optimizer.betas.1") or WARMUP
    kind: str  # log | zero | decay | linear
    anchor: float  # the value at x = 0
    factor: float  # grid ratio per step (log, zero, decay) or the step itself (linear)
    lo: float | None = None  # smallest allowed x (a hard bound); None: unbounded
    hi: float | None = None
    start: float = 0.0  # x of the default

    def value(self, x: float) -> float:
        if self.kind == "linear":
            return _round(self.anchor + x * self.factor)
        if self.kind == "decay":
            return 1.0 - _round((1.0 - self.anchor) * self.factor**x)
        if self.kind == "zero" and self.lo is not None and x <= self.lo + 1e-9:
            return 0.0
        return _round(self.anchor * self.factor**x)

    def allowed(self, x: float) -> bool:
        return (self.lo is None or x >= self.lo - 1e-9) and (self.hi is None or x <= self.hi + 1e-9)


def _round(v: float, digits: int = 4) -> float:
    """4 significant digits: readable configs, and a grid position always gives the same value."""
    return 0.0 if v == 0 else float(f"{v:.{digits}g}")


def interval(text: str) -> tuple[float, float] | None:
    """(lo, hi) of an Optuna range in Hydra's sweep syntax, e.g. 'tag(log, interval(1e-4, 1e-2))'."""
    m = _INTERVAL.search(text)
    return (float(m.group(1)), float(m.group(2))) if m else None


def _is_rate(key: str) -> bool:
    name = key.rsplit(".", 2)
    return any(part.startswith(("beta", "momentum")) for part in name[-2:]) or key.endswith(".alpha")


def make_axis(key: str, space: str, default: float, factor: float, zero_steps: int) -> Axis:
    """The axis of one search-space entry at its default value (see the module docstring)."""
    rng = interval(space)
    lo, hi = rng if rng else (None, None)
    if "log" in space:
        if default <= 0:
            raise ValueError(f"{key}={default} is searched on a log scale, so its default must be > 0")
        return Axis(key, "log", float(default), factor)
    if key == WARMUP or key.endswith("weight_decay") or lo == 0 and not _is_rate(key):
        hi_x = math.log(MAX_WARMUP / default, factor) if key == WARMUP and default > 0 else None
        if default > 0:
            return Axis(key, "zero", float(default), factor, lo=-(zero_steps + 1), hi=hi_x)
        top = MAX_WARMUP / factor if key == WARMUP else hi
        if not top or top <= 0:
            raise ValueError(f"{key} has a default of 0 and no range above it to search")
        return Axis(key, "zero", float(top), factor, lo=-(zero_steps + 1), start=-(zero_steps + 1))
    if _is_rate(key) and 0 <= default < 1 and (lo is None or lo >= 0):
        return Axis(key, "decay", float(default), factor, hi=math.log(1.0 / (1.0 - default), factor))
    if lo is None or hi is None or hi <= lo:
        raise ValueError(f"{key}: cannot make a grid from the search space {space!r}")
    step = (hi - lo) / 4
    return Axis(key, "linear", float(default), step, lo=(lo - default) / step, hi=(hi - default) / step)


def order(key: str, lr_keys: tuple[str, ...] = ("optimizer.lr",)) -> int:
    if key in lr_keys:
        return 0
    if key.endswith("weight_decay"):
        return 1
    if key == WARMUP:
        return 2
    return 3 if _is_rate(key) else 4


def axes_for(space: dict[str, str], defaults: dict[str, float], factor: float, zero_steps: int,
             lr_keys: tuple[str, ...] = ("optimizer.lr",)) -> list[Axis]:  # fmt: skip
    """Axes of a spec's search space, in tuning order; `space` has WARMUP in place of schedule.warmup_steps,
    `defaults` the starting value of every key, `lr_keys` the optimizer's learning rates (its spec's lr_fields:
    Muon's adamw_lr, for the embeddings and the head, is tuned right after its lr, not last)."""
    rank = lambda k: (order(k, lr_keys), lr_keys.index(k) if k in lr_keys else 0, list(space).index(k))
    keys = sorted(space, key=rank)
    return [make_axis(k, space[k], defaults[k], factor, zero_steps) for k in keys]
