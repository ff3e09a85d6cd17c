"""Speedup as data saved: how much more data the baseline (AdamW) needs to reach an optimizer's loss.

The baseline's final loss against its budget D (tokens per parameter, each a full run ending at D) is
modelled as a saturating power law, the data term of Chinchilla's loss (Hoffmann et al. 2022, eq. 2, at a
fixed model size):

    L(D) = E + A * D^(-alpha),    A > 0, alpha > 0

E is the loss this model would reach with unlimited data. The fit is least squares over every finished
seed at every budget, by variable projection: for a fixed alpha the model is linear in (E, A), which
ordinary least squares solves exactly, so only alpha is searched (a log grid, then a bounded Brent step
around the best grid point). No starting guess can send it to a wrong local minimum.

For an optimizer whose mean final loss at budget D is L, the baseline would need D_eq = (A / (L - E))^(1/alpha)
to reach it, and the speedup is D_eq / D: 1.5 means the baseline needs 1.5x the data. L <= E gives an
infinite speedup (beyond the baseline's asymptote); a failed or diverged seed makes the mean infinite, so
the speedup is 0 (an optimizer cannot win by dropping the seeds it lost). D_eq outside the baseline's
budgets is an extrapolation of its curve and is flagged.

The interval is a parametric bootstrap over seeds: each replicate draws every mean from its sampling
distribution given the seeds, mean + sem * t (Student's t with seeds - 1 degrees of freedom: with 3 seeds
a plain resampling of the seeds has only 10 distinct means and intervals that are too narrow), the
baseline's at each of its budgets (then refits its curve) and the optimizer's at D, and inverts.
The fit is checked by its R^2, the residual of each budget's mean against that mean's standard error, and,
with more budgets than the curve's 3 parameters and several seeds, the lack-of-fit F-test (pure error
from the seeds against the residual the curve leaves).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

ALPHAS = np.geomspace(0.01, 4.0, 400)


@dataclass(frozen=True)
class PowerLaw:
    E: float
    A: float
    alpha: float

    def loss(self, budget):
        return self.E + self.A * np.asarray(budget, dtype=float) ** -self.alpha

    def budget_for(self, loss: float) -> float:
        """The budget at which this curve reaches `loss`: inf at or below E, 0 for an infinite loss."""
        if not math.isfinite(loss):
            return 0.0 if loss > 0 else math.inf
        if loss <= self.E:
            return math.inf
        return (self.A / (loss - self.E)) ** (1.0 / self.alpha)


def _linear_fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares y = E + A x for each row of x (one row per alpha): E, A and the residual sum of squares."""
    xm, ym = x.mean(axis=-1, keepdims=True), y.mean()
    sxx = ((x - xm) ** 2).sum(axis=-1)
    a = ((x - xm) * (y - ym)).sum(axis=-1) / np.where(sxx > 0, sxx, np.nan)
    e = ym - a * xm[..., 0]
    sse = ((y - e[..., None] - a[..., None] * x) ** 2).sum(axis=-1)
    return e, a, sse


def fit_power_law(budgets, losses) -> PowerLaw | None:
    """Least-squares L(D) = E + A D^-alpha through the points (budgets[i], losses[i]); None when fewer than
    3 distinct budgets, or when the loss does not fall with the budget (the best fit has A <= 0)."""
    d, y = np.asarray(budgets, dtype=float), np.asarray(losses, dtype=float)
    if len(np.unique(d)) < 3 or not np.all(np.isfinite(y)):
        return None
    e, a, sse = _linear_fit(d[None, :] ** -ALPHAS[:, None], y)
    sse = np.where(a > 0, sse, np.inf)
    if not np.isfinite(sse).any():
        return None
    k = int(np.nanargmin(sse))
    lo, hi = ALPHAS[max(k - 1, 0)], ALPHAS[min(k + 1, len(ALPHAS) - 1)]

    def sse_at(alpha: float) -> float:
        e1, a1, s1 = _linear_fit(d[None, :] ** -alpha, y)
        return float(s1[0]) if a1[0] > 0 else math.inf

    best = optimize.minimize_scalar(sse_at, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10})
    alpha = float(best.x) if best.fun <= sse[k] else float(ALPHAS[k])
    e1, a1, _ = _linear_fit(d[None, :] ** -alpha, y)
    return PowerLaw(float(e1[0]), float(a1[0]), alpha)


def fit_check(law: PowerLaw, budgets, losses) -> dict:
    """How well the curve describes the points: R^2, RMSE, per budget the mean's residual and its standard
    error, and the lack-of-fit F-test when there are more budgets than 3 and seeds to measure pure error."""
    d, y = np.asarray(budgets, dtype=float), np.asarray(losses, dtype=float)
    resid = y - law.loss(d)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    out = {"r2": 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else None,
           "rmse": float(np.sqrt((resid**2).mean())), "budgets": [], "lack_of_fit_p": None,
           "lack_of_fit_df": None}  # fmt: skip
    ss_pe = ss_lof = 0.0
    levels = sorted(set(d.tolist()))
    for b in levels:
        ys = y[d == b]
        mean = float(ys.mean())
        sem = float(ys.std(ddof=1) / np.sqrt(len(ys))) if len(ys) > 1 else None
        out["budgets"].append({"budget": b, "n": len(ys), "mean": mean, "fit": float(law.loss(b)),
                               "residual": mean - float(law.loss(b)), "sem": sem})  # fmt: skip
        ss_pe += float(((ys - mean) ** 2).sum())
        ss_lof += len(ys) * (mean - float(law.loss(b))) ** 2
    df_lof, df_pe = len(levels) - 3, len(y) - len(levels)
    if df_lof > 0 and df_pe > 0 and ss_pe > 0:
        f = (ss_lof / df_lof) / (ss_pe / df_pe)
        out |= {"lack_of_fit_p": float(stats.f.sf(f, df_lof, df_pe)), "lack_of_fit_df": [df_lof, df_pe]}
    return out


def mean_loss(losses) -> float:
    """The mean over seeds, infinite when any seed failed or diverged (its loss is inf or nan)."""
    arr = np.asarray(losses, dtype=float)
    return math.inf if len(arr) == 0 or not np.all(np.isfinite(arr)) else float(arr.mean())


def speedup(law: PowerLaw, budget: float, losses) -> float:
    """D_eq / D for the mean of `losses` at `budget` (see the module docstring)."""
    return law.budget_for(mean_loss(losses)) / budget


def baseline_points(curve: dict[float, list[float]]) -> tuple[list[float], list[float]]:
    """(budgets, losses) of the baseline's finished seeds: {budget: [loss per seed]} -> two flat lists."""
    pairs = [(b, x) for b, xs in sorted(curve.items()) for x in xs if math.isfinite(x)]
    return [b for b, _ in pairs], [x for _, x in pairs]


def _mean_sem(values) -> tuple[float, float | None, int]:
    arr = np.asarray(values, dtype=float)
    sd = float(arr.std(ddof=1)) if len(arr) > 1 else None
    return float(arr.mean()), (sd / math.sqrt(len(arr)) if sd is not None else None), len(arr) - 1


def bootstrap_laws(curve: dict[float, list[float]], n: int, rng: np.random.Generator) -> list[PowerLaw | None]:
    """n refits of the baseline's curve, each through its per-budget means drawn as mean + sem * t(seeds - 1).
    A budget with one finished seed takes the standard deviation pooled over the other budgets. []: no budget
    has two finished seeds, so there is no seed noise to draw from."""
    finite = {b: [x for x in xs if math.isfinite(x)] for b, xs in sorted(curve.items())}
    finite = {b: xs for b, xs in finite.items() if xs}
    stats_ = {b: _mean_sem(xs) for b, xs in finite.items()}
    dfs = sum(df for _, sem, df in stats_.values() if sem is not None)
    if dfs == 0:
        return []
    pooled = math.sqrt(sum(np.var(xs, ddof=1) * (len(xs) - 1) for xs in finite.values() if len(xs) > 1) / dfs)
    budgets = list(finite)
    draws = np.column_stack([
        mean + (sem if sem is not None else pooled) * rng.standard_t(df if sem is not None else dfs, size=n)
        for mean, sem, df in (stats_[b] for b in budgets)
    ])  # fmt: skip
    return [fit_power_law(budgets, row) for row in draws]


def speedup_interval(laws: list[PowerLaw | None], budget: float, losses, rng: np.random.Generator,
                     level: float = 0.95) -> tuple[float, float] | None:  # fmt: skip
    """The speedup's interval: replicate i inverts laws[i] at the optimizer's mean drawn as mean + sem * t(seeds
    - 1), and the interval is the central `level` of the replicates. With a failed seed the interval starts at 0
    (the speedup is 0) and ends where the finished seeds alone would put its top. None with fewer than 2
    finished seeds or no usable refit."""
    arr = np.asarray(losses, dtype=float)
    finite = arr[np.isfinite(arr)]
    if len(finite) < len(arr):
        rest = speedup_interval(laws, budget, finite, rng, level) if len(finite) >= 2 else None
        return (0.0, rest[1] if rest else 0.0)
    usable = [law for law in laws if law is not None]
    if len(finite) < 2 or not usable:
        return None
    mean, sem, df = _mean_sem(finite)
    draws = mean + sem * rng.standard_t(df, size=len(usable))
    ratios = np.asarray([law.budget_for(float(x)) / budget for law, x in zip(usable, draws, strict=True)])
    q = (1 - level) / 2  # inf (beyond the asymptote) stays inf: the quantiles below take order, not averages
    return float(np.quantile(ratios, q, method="lower")), float(np.quantile(ratios, 1 - q, method="higher"))
