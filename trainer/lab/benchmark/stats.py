"""Significance over seeds: Welch's t-test and Holm's correction for several tests at once.

scripts/compare.py uses both too, so that a table with one row per optimizer corrects for its many
comparisons the same way the benchmark does.
"""

from __future__ import annotations

import math
import statistics
import warnings

from scipy import stats


def welch(a: list[float], b: list[float]) -> dict | None:
    """mean(a) - mean(b) with Welch's t-test: {diff, t, df, p, n}; t, df and p are None with fewer than
    two values on a side; None when a side is empty. Non-finite values must be removed by the caller."""
    if not a or not b:
        return None
    out = {"diff": statistics.fmean(a) - statistics.fmean(b), "t": None, "df": None, "p": None, "n": [len(a), len(b)]}
    if len(a) >= 2 and len(b) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # identical values: nan t and p
            res = stats.ttest_ind(a, b, equal_var=False)
        finite = lambda x: float(x) if x is not None and math.isfinite(float(x)) else None
        out |= {"t": finite(res.statistic), "df": finite(getattr(res, "df", None)), "p": finite(res.pvalue)}
        if out["p"] is None and out["diff"] == 0:
            out["p"] = 1.0  # both sides constant and equal
    return out


def steps_to_target(ev: list[tuple[int, float, float]], target: float) -> tuple[float, float] | None:
    """(step, train seconds) where the val loss first reaches target, linearly interpolated between the eval
    before and the first eval at or below it: step = s0 + (l0 - target) / (l0 - l1) * (s1 - s0); the first
    eval's own step when it already is at or below. ev: (step, val loss, train seconds) per eval. None if never."""
    for i, (s1, l1, t1) in enumerate(ev):
        if l1 <= target:
            if i == 0 or not math.isfinite(ev[i - 1][1]):
                return float(s1), t1
            s0, l0, t0 = ev[i - 1]
            f = (l0 - target) / (l0 - l1)
            return s0 + f * (s1 - s0), t0 + f * (t1 - t0)
    return None


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (Holm 1979), in the order given; None stays None and is not
    counted among the tests. Rejecting every hypothesis whose adjusted p is below alpha controls the
    family-wise error rate at alpha: the smallest of m p-values is multiplied by m, the next by m - 1,
    and so on, each kept at least as large as the one before it and at most 1."""
    present = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(present)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted
