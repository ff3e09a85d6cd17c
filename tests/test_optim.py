"""Optimizer builder and learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from models.minigpt import GPTConfig, MiniGPT
from optim.builder import build_optimizer, param_groups
from optim.schedules import build_scheduler, lr_factor
from trainer.config import OptimizerConfig, ScheduleConfig


def model() -> MiniGPT:
    return MiniGPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))


def test_decay_groups_split_matrices_from_biases_and_norms():
    m = model()
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))  # tied weight once, nothing missed
    assert any(p is m.wte.weight for p in decay["params"])
    assert any(p is m.ln_f.weight for p in no_decay["params"])


@pytest.mark.parametrize("impl, flag", [("auto", "fused"), ("fused", "fused"), ("foreach", "foreach")])
def test_adamw_is_torch_adamw_with_configured_hyperparameters(impl, flag):
    cfg = OptimizerConfig(lr=3e-4, weight_decay=0.05, betas=[0.8, 0.99], eps=1e-6, impl=impl)
    opt = build_optimizer(model(), cfg, torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (3e-4, (0.8, 0.99), 1e-6, 0.05)
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert g[flag] is True


def factors(name: str, max_steps: int = 100, **kw) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, ScheduleConfig(name=name, **kw), max_steps)
    return [lr_factor(sched, s) for s in range(max_steps + 1)]


def test_constant_warms_up_then_holds():
    f = factors("constant", warmup_steps=10)
    assert f[0] == 0.0 and f[5] == pytest.approx(0.5) and f[10] == 1.0 and f[100] == 1.0


def test_cosine_boundaries():
    f = factors("cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert f[0] == 0.0 and f[5] == pytest.approx(0.5)
    assert f[10] == pytest.approx(1.0)  # peak right after warmup
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert f[100] == pytest.approx(0.1)  # floor at max_steps
    assert all(f[i] >= f[i + 1] for i in range(10, 100))


def test_wsd_boundaries():
    f = factors("wsd", warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2, decay_type="linear")
    assert f[0] == 0.0 and f[10] == 1.0
    assert f[79] == 1.0  # stable stage: steps 10..79
    assert f[80] == 1.0 and f[90] == pytest.approx(0.5) and f[100] == 0.0  # linear decay over the last 20
    g = factors("wsd", warmup_steps=0, min_lr_ratio=0.1, decay_fraction=0.5, decay_type="cosine")
    assert g[50] == 1.0 and g[75] == pytest.approx(0.1 + 0.9 * 0.5) and g[100] == pytest.approx(0.1)


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
