"""What an optimizer is doing, as numbers: the shared toolkit for optimizer-state statistics.

Each optimizer family defines its statistics in its own module, next to the optimizer, as a function
`stats(ctx: StatsContext, out: Reducer) -> None` registered with `@register(..., stats=fn)`. The trainer
calls it every `trainer.stats_interval` steps, right after the optimizer step, and logs the results
under `opt/<key>`.

Statistics describe the whole model, also under FSDP, where each rank holds shards (DTensors) of every
parameter and its state. So a statistic is written as sums, minima, maxima or histogram counts over
the elements each rank holds (`Reducer`); the reducer adds them over the ranks with one all-reduce per
kind, and only then forms ratios, square roots and medians. On one process the same code gives the
same numbers (tested: FSDP on 2 ranks against one process).

Medians and other quantiles come from a histogram of log10 |x| with BINS_PER_DECADE bins per decade,
so they are exact to within a factor 10 ** (1 / BINS_PER_DECADE) (~15%), the same on any number of ranks.
Everything stays on the device; the host reads the results once, at the end (a log step).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

BINS_PER_DECADE = 16
LOG10_RANGE = (-40.0, 10.0)  # |x| below 1e-40 (and exact zeros) land in the first bin, above 1e10 in the last
N_BINS = int((LOG10_RANGE[1] - LOG10_RANGE[0]) * BINS_PER_DECADE)


def local(t: torch.Tensor) -> torch.Tensor:
    """The elements this rank holds: a DTensor's local shard, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


@dataclass
class StatsContext:
    """One optimizer step, seen right after it: everything a family's statistics may read."""

    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]  # every trained parameter (DTensors under FSDP), in the model's order
    grads: list[torch.Tensor | None]  # the gradients this step used (after clipping), as the params
    updates: list[torch.Tensor]  # this rank's part of (parameter after the step - before)
    before: list[torch.Tensor]  # this rank's part of the parameters before the step
    # the previous step's updates, when the optimizer registered `stats_previous_update=True` (else None)
    previous_updates: list[torch.Tensor] | None = None
    memory: dict = field(default_factory=dict)  # kept across calls

    def state(self, key: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(parameters, their state[key]) for every parameter that has that state entry."""
        found = [(p, self.optimizer.state[p][key]) for p in self.params if key in self.optimizer.state.get(p, {})]
        return [p for p, _ in found], [s for _, s in found]

    def group_of(self, p: torch.Tensor) -> dict:
        return next(g for g in self.optimizer.param_groups if any(q is p for q in g["params"]))

    def positions(self, params: Iterable[torch.Tensor]) -> list[int]:
        """Where these parameters sit in `params` (and so in `grads`, `updates`, `before`)."""
        where = {id(p): i for i, p in enumerate(self.params)}
        return [where[id(p)] for p in params]


class Reducer:
    """Collects per-rank partial statistics on the device; `finish()` reduces them over the ranks.

    Each method takes the tensors this rank holds (DTensors are read through their local shards).
    `scoped("opt/")` gives a view that writes every key under a prefix, into the same tables.
    """

    def __init__(self) -> None:
        self._tables: dict[str, dict[str, torch.Tensor]] = {"sum": {}, "min": {}, "max": {}, "hist": {}}
        self._derived: list = []  # (key, fn(values) -> float): computed after the reduction
        self._prefix = ""

    def scoped(self, prefix: str) -> Reducer:
        view = Reducer.__new__(Reducer)
        view._tables, view._derived, view._prefix = self._tables, self._derived, self._prefix + prefix
        return view

    def _key(self, key: str) -> str:
        """`m_norm` -> `opt/m_norm`; internal keys keep their leading part: `_sq/m` -> `_sq/opt/m`."""
        head, sep, rest = key.partition("/")
        return f"{head}/{self._prefix}{rest}" if key.startswith("_") and sep else self._prefix + key

    def _put(self, table: str, key: str, value: torch.Tensor, combine) -> None:
        key, t = self._key(key), self._tables[table]
        if key in t and t[key].dim() and t[key].device != value.device:  # an empty default made on the CPU
            t[key] = t[key].to(value.device)
        t[key] = combine(t[key], value) if key in t else value

    # ---- partial quantities -------------------------------------------------------------------------
    def add_sum(self, key: str, value: torch.Tensor) -> None:
        self._put("sum", key, value.detach().float().reshape(()), torch.add)

    def sum_of(self, key: str, tensors: Iterable[torch.Tensor], fn=None) -> None:
        """Sum of fn(x) over every element (fn defaults to x)."""
        parts = [(fn(local(t).float()) if fn else local(t).float()).sum() for t in tensors]
        self.add_sum(key, torch.stack(parts).sum() if parts else torch.zeros(()))

    def count(self, key: str, tensors: Iterable[torch.Tensor]) -> None:
        self.add_sum(key, torch.tensor(float(sum(local(t).numel() for t in tensors))))

    def min_of(self, key: str, tensors: Iterable[torch.Tensor]) -> None:
        mins = [local(t).float().min() for t in tensors if local(t).numel()]
        self._put("min", key, torch.stack(mins).min() if mins else torch.tensor(float("inf")), torch.minimum)

    def max_of(self, key: str, tensors: Iterable[torch.Tensor]) -> None:
        maxs = [local(t).float().max() for t in tensors if local(t).numel()]
        self._put("max", key, torch.stack(maxs).max() if maxs else torch.tensor(float("-inf")), torch.maximum)

    def histogram(self, key: str, tensors: Iterable[torch.Tensor]) -> None:
        """Counts of log10 |x| in N_BINS bins (for medians and W&B histograms); all zero for no tensors."""
        for t in tensors:
            x = local(t).detach().float().abs().flatten()
            b = ((torch.log10(x.clamp_min(1e-40)) - LOG10_RANGE[0]) * BINS_PER_DECADE).floor().long()
            counts = torch.bincount(b.clamp(0, N_BINS - 1), minlength=N_BINS).float()
            self._put("hist", key, counts, torch.add)
        self._tables["hist"].setdefault(self._key(key), torch.zeros(N_BINS))  # the key exists without tensors

    # ---- common statistics built from the partial ones ---------------------------------------------
    def norm(self, key: str, tensors: Sequence[torch.Tensor]) -> None:
        """The L2 norm over all elements of all tensors."""
        self.sum_of(f"_sq/{key}", tensors, lambda x: x * x)
        self.derive(key, lambda v: v[f"_sq/{key}"] ** 0.5)

    def mean(self, key: str, tensors: Sequence[torch.Tensor], fn=None) -> None:
        self.sum_of(f"_sum/{key}", tensors, fn)
        self.count(f"_n/{key}", tensors)
        self.derive(key, lambda v: v[f"_sum/{key}"] / max(v[f"_n/{key}"], 1.0))

    def fraction(self, key: str, masks: Sequence[torch.Tensor]) -> None:
        """The fraction of elements where a boolean mask is true."""
        self.mean(key, masks, lambda x: x)

    def cosine(self, key: str, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> None:
        """cos(a, b) with each list read as one long vector."""
        self.add_sum(f"_dot/{key}", _dot(a, b))
        self.sum_of(f"_sqa/{key}", a, lambda x: x * x)
        self.sum_of(f"_sqb/{key}", b, lambda x: x * x)
        self.derive(key, lambda v: v[f"_dot/{key}"] / max((v[f"_sqa/{key}"] * v[f"_sqb/{key}"]) ** 0.5, 1e-30))

    def spread(self, key: str, tensors: Iterable[torch.Tensor]) -> None:
        """min, median (from the histogram) and max of |x| as key/min, key/median, key/max.

        Reads the tensors one at a time, so a generator that computes each (e.g. a per-coordinate step
        size) holds one temporary at a time. No tensors: min inf, max -inf, median nan."""
        for t in tensors:
            absolute = [local(t).abs()]
            self.min_of(f"{key}/min", absolute)
            self.max_of(f"{key}/max", absolute)
            self.histogram(f"_hist/{key}", absolute)
        for table, name, empty in (("min", "min", float("inf")), ("max", "max", float("-inf"))):
            self._tables[table].setdefault(self._key(f"{key}/{name}"), torch.tensor(empty))
        self.histogram(f"_hist/{key}", [])  # (registers empty counts when there were no tensors)
        self.derive(f"{key}/median", lambda v: quantile(v[f"_hist/{key}"], 0.5))

    def spread_of(self, key: str, numbers: Callable[[dict], list[float]]) -> None:
        """Exact min, median and max (key/min, key/median, key/max) of a list of numbers formed on the host
        after the reduction by `numbers(values)`, e.g. one ratio per tensor from per-tensor sums."""
        for name, pick in (("min", min), ("median", statistics.median), ("max", max)):
            self.derive(f"{key}/{name}", lambda v, pick=pick: pick(xs) if (xs := numbers(v)) else float("nan"))

    def derive(self, key: str, fn) -> None:
        """A statistic computed on the host after the reduction, from the values by this view's keys."""
        self._derived.append((self._key(key), lambda values: fn(_View(values, self))))

    # ---- reduction ----------------------------------------------------------------------------------
    def finish(self, reduce=None) -> dict:
        """Reduce over ranks with `reduce(tensor, op)` (op: sum | min | max; None on one process), read
        the results on the host (the one sync), and return {key: float}, plus the histogram counts under
        their `_hist/` keys; other internal (`_`) keys are dropped."""
        values: dict = {}
        for op, table in self._tables.items():
            if not table:
                continue
            keys = list(table)
            device = next((v.device for v in table.values() if v.device.type != "cpu"), torch.device("cpu"))
            stacked = torch.stack([table[k].to(device) for k in keys])
            if reduce is not None:
                stacked = reduce(stacked, "sum" if op == "hist" else op)
            rows = stacked.cpu()
            values.update(zip(keys, rows if op == "hist" else rows.tolist(), strict=True))
        for key, fn in self._derived:
            values[key] = fn(values)
        return {k: v for k, v in values.items() if not k.startswith("_") or k.startswith("_hist/")}


class _View:
    """The reduced values, looked up by a scoped reducer's own key names."""

    def __init__(self, values: dict, reducer: Reducer):
        self._values, self._reducer = values, reducer

    def __getitem__(self, key: str):
        return self._values[self._reducer._key(key)]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    parts = [(local(x).float() * local(y).float()).sum() for x, y in zip(a, b, strict=True)]
    return torch.stack(parts).sum() if parts else torch.zeros(())


def quantile(counts: torch.Tensor, q: float) -> float:
    """The q-quantile of |x| from log10 histogram counts (the geometric centre of its bin)."""
    total = float(counts.sum())
    if total == 0:
        return float("nan")
    index = int(torch.searchsorted(torch.cumsum(counts, 0), torch.tensor(q * total)).clamp(max=N_BINS - 1))
    return 10 ** (LOG10_RANGE[0] + (index + 0.5) / BINS_PER_DECADE)
