"""The benchmark's statistics against synthetic curves with known answers: the power-law fit, its check, the
speedup as data saved with its bootstrap interval, Holm's correction, and failed seeds (trainer/lab/benchmark)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from trainer.lab.benchmark.speedup import (
    baseline_points,
    bootstrap_laws,
    fit_check,
    fit_power_law,
    speedup,
    speedup_interval,
)
from trainer.lab.benchmark.stats import holm

BUDGETS = [5.0, 10.0, 20.0, 40.0]


def adamw(d):
    return 2.0 + 3.0 * np.asarray(d, dtype=float) ** -0.5  # the L(D) = 2 + 3 D^-0.5


def seeds(curve, budget, rng, n=3, sd=0.003):
    return list(curve(budget) + rng.normal(0.0, sd, n))


def baseline(rng, sd=0.003):
    return {b: seeds(adamw, b, rng, sd=sd) for b in BUDGETS}


def test_fit_recovers_the_curve_exactly_without_noise():
    d = [b for b in BUDGETS for _ in range(3)]
    law = fit_power_law(d, adamw(d))
    assert (law.E, law.A, law.alpha) == pytest.approx((2.0, 3.0, 0.5), rel=1e-6)
    assert law.budget_for(float(adamw(17.0))) == pytest.approx(17.0, rel=1e-6)


@pytest.mark.parametrize("noise_seed", range(5))
def test_an_optimizer_exactly_1_5x_as_data_efficient_gives_1_5(noise_seed):
    rng = np.random.default_rng(noise_seed)
    curve = baseline(rng)
    d, y = baseline_points(curve)
    law = fit_power_law(d, y)
    laws = bootstrap_laws(curve, 400, rng)
    for budget in (5.0, 10.0, 20.0):  # it reaches at D what AdamW reaches at 1.5 D
        losses = seeds(lambda x: adamw(1.5 * x), budget, rng)
        assert speedup(law, budget, losses) == pytest.approx(1.5, rel=0.02)
        lo, hi = speedup_interval(laws, budget, losses, rng)
        assert lo < speedup(law, budget, losses) < hi and hi - lo < 0.3  # coverage: the test below


def test_no_speedup_gives_an_interval_that_contains_1():
    rng = np.random.default_rng(100)
    curve = baseline(rng)
    law = fit_power_law(*baseline_points(curve))
    laws = bootstrap_laws(curve, 1000, rng)
    for budget in (5.0, 10.0, 20.0):
        losses = seeds(adamw, budget, rng)
        assert speedup(law, budget, losses) == pytest.approx(1.0, rel=0.05)
        lo, hi = speedup_interval(laws, budget, losses, rng)
        assert lo <= 1.0 <= hi


@pytest.mark.parametrize("true_speedup", [1.0, 1.5])
def test_the_95_percent_interval_covers_the_true_speedup_about_95_percent_of_the_time(true_speedup):
    """With 3 seeds a side, over 25 simulated benchmarks (fresh noise each), at each of 3 budgets: 75 intervals,
    of which about 71 should hold the truth (86% is 3.6 standard deviations below 95%)."""
    rng = np.random.default_rng(7)
    hits = total = 0
    for _ in range(25):
        curve = baseline(rng)
        laws = bootstrap_laws(curve, 200, rng)
        for budget in (5.0, 10.0, 20.0):
            lo, hi = speedup_interval(laws, budget, seeds(lambda x: adamw(true_speedup * x), budget, rng), rng)
            hits, total = hits + (lo <= true_speedup <= hi), total + 1
    assert 0.86 <= hits / total, hits / total


def test_a_failed_seed_never_lets_an_optimizer_win():
    """Two seeds far better than AdamW and one that diverged: the mean is infinite, the speedup 0, and the
    interval reaches 0 (the failed seed is drawn in most replicates)."""
    rng = np.random.default_rng(0)
    curve = baseline(rng)
    law = fit_power_law(*baseline_points(curve))
    great = list(adamw(5 * 10.0)[None].repeat(2))
    for bad in (math.nan, math.inf):
        losses = [*great, bad]
        assert speedup(law, 10.0, losses) == 0.0
        lo, hi = speedup_interval(bootstrap_laws(curve, 200, rng), 10.0, losses, rng)
        assert lo == 0.0 and hi > 4  # 0 with the failure, the finished seeds' top without it
    assert speedup(law, 10.0, great) > 4  # the same seeds without the failure would have won


def test_a_loss_below_the_asymptote_is_an_infinite_speedup_and_worse_than_the_smallest_budget_is_below_1():
    law = fit_power_law([b for b in BUDGETS for _ in range(2)], adamw([b for b in BUDGETS for _ in range(2)]))
    assert speedup(law, 10.0, [1.9, 1.95]) == math.inf
    assert speedup(law, 5.0, [float(adamw(2.0))] * 3) == pytest.approx(0.4, rel=1e-6)


def test_fit_check_finds_a_curve_that_misses_the_means_and_passes_one_that_does_not():
    rng = np.random.default_rng(3)
    good = baseline(rng, sd=0.002)
    d, y = baseline_points(good)
    check = fit_check(fit_power_law(d, y), d, y)
    assert check["lack_of_fit_p"] > 0.05 and check["r2"] > 0.999 and check["lack_of_fit_df"] == [1, 8]
    bent = {b: [x + (0.03 if b == 10.0 else 0.0) for x in xs] for b, xs in good.items()}  # not a power law
    d, y = baseline_points(bent)
    check = fit_check(fit_power_law(d, y), d, y)
    assert check["lack_of_fit_p"] < 0.01
    worst = max(check["budgets"], key=lambda b: abs(b["residual"]))
    assert abs(worst["residual"]) > 3 * worst["sem"]


def test_no_fit_when_the_loss_does_not_fall_or_has_too_few_budgets():
    assert fit_power_law([5, 10, 20], [2.0, 2.1, 2.2]) is None  # rises with the data
    assert fit_power_law([5, 5, 10, 10], [2.5, 2.6, 2.3, 2.2]) is None  # 2 budgets for 3 parameters


def step_down_rejects(pvalues: list[float], alpha: float) -> list[bool]:
    """Holm's procedure as defined (Holm 1979): sort, reject while p_(j) <= alpha / (m - j + 1), stop at the
    first that is not."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    rejected, m = [False] * len(pvalues), len(pvalues)
    for j, i in enumerate(order):
        if pvalues[i] > alpha / (m - j):
            break
        rejected[i] = True
    return rejected


def test_holm_adjusted_p_values_reject_exactly_what_the_step_down_procedure_rejects():
    rng = np.random.default_rng(0)
    for m, _ in itertools.product((1, 2, 3, 5, 14), range(40)):
        p = list(rng.uniform(0, 0.1, m) ** rng.uniform(0.5, 2))
        adjusted = holm(p)
        for alpha in (0.01, 0.05, 0.1):
            assert [a <= alpha for a in adjusted] == step_down_rejects(p, alpha)
        assert all(a >= x for a, x in zip(adjusted, p, strict=True)) and max(adjusted) <= 1.0


def test_holm_by_hand_and_missing_values():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # 3 x 0.01, max(2 x 0.03, .03), max(.04, .06)
    assert holm([0.02, None, 0.5]) == pytest.approx([0.04, None, 0.5])  # None is no test: m = 2
    assert holm([]) == []
