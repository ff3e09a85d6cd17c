"""Learning-rate schedules: values at the warmup, stable and decay boundaries, and agreement with
transformers' functions where both define the curve."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.optimization import get_inverse_sqrt_schedule, get_linear_schedule_with_warmup

from optim.schedules import SCHEDULES, ScheduleConfig, build_scheduler, constant_scheduler, lr_factor


def sgd() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def factors(name: str, max_steps: int = 100, **kw) -> list[float]:
    sched = build_scheduler(sgd(), ScheduleConfig(name=name, **kw), max_steps)
    return [lr_factor(sched, s) for s in range(max_steps + 1)]


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_warms_up_linearly_from_zero(name):
    f = factors(name, warmup_steps=10, min_lr_ratio=0.1)
    if name == "wsd":  # transformers' WSD warms up from min_lr_ratio
        assert f[0] == pytest.approx(0.1) and f[5] == pytest.approx(0.1 + 0.9 * 0.5)
    else:
        assert f[0] == 0.0 and f[5] == pytest.approx(0.5)
    assert f[10] == pytest.approx(1.0)
    assert all(0 <= x <= 1.0 + 1e-12 for x in f)


def test_constant_holds():
    f = factors("constant", warmup_steps=10)
    assert f[10] == f[55] == f[100] == 1.0


def test_cosine_boundaries():
    f = factors("cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert f[100] == pytest.approx(0.1)  # floor at max_steps
    assert all(f[i] >= f[i + 1] for i in range(10, 100))


def test_wsd_boundaries():
    f = factors("wsd", warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2, decay_type="linear")
    assert f[79] == 1.0 and f[80] == 1.0  # stable stage: steps 10..80
    assert f[90] == pytest.approx(0.5) and f[100] == 0.0  # linear decay over the last 20
    g = factors("wsd", warmup_steps=0, min_lr_ratio=0.1, decay_fraction=0.5, decay_type="cosine")
    assert g[50] == 1.0 and g[75] == pytest.approx(0.1 + 0.9 * 0.5) and g[100] == pytest.approx(0.1)
    h = factors("wsd", warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.5, decay_type="1-sqrt")
    assert h[75] == pytest.approx(1 - math.sqrt(0.5))


def test_linear_without_floor_is_transformers_linear():
    ours = factors("linear", warmup_steps=10, min_lr_ratio=0.0)
    ref = get_linear_schedule_with_warmup(sgd(), 10, 100)
    assert ours == pytest.approx([lr_factor(ref, s) for s in range(101)], abs=1e-12)
    floored = factors("linear", warmup_steps=10, min_lr_ratio=0.2)
    assert floored[55] == pytest.approx(0.6) and floored[100] == pytest.approx(0.2)


def test_step_decay():
    f = factors("step", warmup_steps=10, step_size=20, gamma=0.5, min_lr_ratio=0.0)
    assert f[29] == 1.0 and f[30] == 0.5 and f[49] == 0.5 and f[50] == 0.25 and f[100] == 0.5**4
    floored = factors("step", warmup_steps=0, step_size=10, gamma=0.1, min_lr_ratio=0.01)
    assert floored[100] == 0.01


def test_exponential_reaches_the_floor_at_max_steps():
    f = factors("exponential", warmup_steps=10, min_lr_ratio=0.01)
    assert f[100] == pytest.approx(0.01)
    assert f[55] == pytest.approx(0.1)  # geometric: halfway in steps is halfway in log-lr
    ratios = [f[i + 1] / f[i] for i in range(10, 99)]
    assert max(ratios) == pytest.approx(min(ratios))


def test_inverse_sqrt_is_transformers():
    ours = factors("inverse_sqrt", warmup_steps=10, timescale=None)
    ref = get_inverse_sqrt_schedule(sgd(), 10)
    assert ours == [lr_factor(ref, s) for s in range(101)]
    assert ours[40] == pytest.approx(1 / math.sqrt(4))  # timescale = warmup: decay 1/sqrt(step/warmup)


def test_scheduler_drives_the_optimizer_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = build_scheduler(opt, ScheduleConfig(name="cosine", warmup_steps=4, min_lr_ratio=0.0), 20)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:5] == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5])
    assert seen[12] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))


def test_constant_scheduler_for_self_scheduling_optimizers():
    sched = constant_scheduler(sgd())
    assert [lr_factor(sched, s) for s in (0, 10, 10_000)] == [1.0, 1.0, 1.0]


def test_every_schedule_is_a_config_option():
    from conftest import REPO

    assert {p.stem for p in (REPO / "configs" / "schedule").glob("*.yaml")} == set(SCHEDULES)
