"""The compiled (fused) optimizer steps of optim/fused.py against the eager ones.

Each hand-written optimizer (and Muon's work around Newton-Schulz, and schedule-free AdamW against the
`schedulefree` package) takes the same 20 steps both ways from the same start, with the lr changed every
step as a scheduler does, a second param group without weight decay, a parameter that misses every
third gradient, and 1-D, 2-D and 3-D tensors; after the first step dynamo may not recompile (so a new lr
is a new value, not a new graph). Bit for bit where the step has the same operations in the same
order; where not, the module of the optimizer says why and these tests hold the stated tolerance:

- square roots: torch's eager CPU sqrt is not correctly rounded (1 ulp off on ~0.7% of elements), the
  compiled one is (AdaBelief's, schedule-free's and 8-bit AdamW's parameters);
- LAMB's trust-ratio norms are sums in another order than torch's norm kernel.

The reference tests (tests/test_optim_lion_lamb_adabelief.py, test_optim_sophia_lookahead.py,
test_optim_adamw8bit.py) run on both steps as well; here also: the config field, `auto`, the trainer's
loop (same losses, exact resume) and a checkpoint crossing from one step to the other.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, compose_cfg, tiny_overrides

from models.minigpt import GPTConfig, MiniGPT
from optim import fused
from optim.adabelief import AdaBelief
from optim.adamw8bit import AdamW8bit
from optim.builder import BuildContext, build_optimizer, load_all
from optim.lamb import Lamb
from optim.lion import Lion
from optim.muon_fused import FusedMuon
from optim.schedulefree_adamw import FusedAdamWScheduleFree
from optim.sophia import SophiaG
from trainer.config import to_typed
from trainer.entry.run import run
from trainer.errors import ConfigError

pytestmark = pytest.mark.usefixtures("inductor_cache")

STEPS = 20
SHAPES = [(48, 40), (4, 8, 6), (7,), (130,), (1,), (300, 70)]  # (300, 70): 8-bit moments; (1,): stays eager
MATRICES = [(64, 32), (32, 96), (48, 48)]  # Muon's: tall (its update is transposed), wide, square


def make(shapes, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def groups(params: list[torch.nn.Parameter], wd: float = 0.1) -> list[dict]:
    return [{"params": params[:3], "weight_decay": wd}, {"params": params[3:], "weight_decay": 0.0}]


def schedulefree(params, fused_step: bool):
    from schedulefree import AdamWScheduleFree

    cls = FusedAdamWScheduleFree if fused_step else AdamWScheduleFree
    opt = cls(groups(params), lr=2e-2, warmup_steps=5)
    opt.train()
    return opt


def muon(params, fused_step: bool):
    return (FusedMuon if fused_step else torch.optim.Muon)(params, lr=0.02, weight_decay=0.1)


# name: (factory(params, fused), shapes, how the two steps compare: "exact", or the key of TOLERANCES)
CASES = {
    "lion": (lambda ps, f: Lion(groups(ps), lr=3e-3, fused=f), SHAPES, "exact"),
    "sophia": (lambda ps, f: SophiaG(groups(ps), lr=1e-2, bs=100, fused=f), SHAPES, "exact"),
    "muon": (muon, MATRICES, "exact"),
    "adabelief": (lambda ps, f: AdaBelief(groups(ps), lr=1e-2, eps=1e-3, fused=f), SHAPES, "sqrt"),
    "adamw8bit": (lambda ps, f: AdamW8bit(groups(ps), lr=1e-2, fused=f), SHAPES, "sqrt"),
    "adamw8bit-bnb_cpu": (lambda ps, f: AdamW8bit(groups(ps), lr=1e-2, rounding="bnb_cpu", fused=f), SHAPES, "sqrt"),
    "lamb": (lambda ps, f: Lamb(groups(ps), lr=1e-2, fused=f), SHAPES, "norms"),
    "schedulefree_adamw": (schedulefree, SHAPES, "sqrt"),
}
# Parameters after 20 steps (relative and absolute; the largest measured differences are 1-5e-7 absolute).
TOLERANCES = {"sqrt": dict(rtol=1e-6, atol=1e-6), "norms": dict(rtol=1e-6, atol=1e-6)}
# State tensors that are bit for bit even where the parameters are not (they never see the sqrt or norms).
# (LAMB's v: torch's fused Adam kernel rounds a tensor's last size % 16 elements in another order.)
EXACT_STATE = {"adabelief": ("exp_avg", "exp_avg_var", "step"), "lamb": ("exp_avg", "step"),
               "adamw8bit": ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax", "exp_avg",
                             "exp_avg_sq", "step")}  # fmt: skip
EXACT_STATE["adamw8bit-bnb_cpu"] = EXACT_STATE["adamw8bit"]


def train(opt, params, steps: range, base_lr: float) -> None:
    for t in steps:
        g = torch.Generator().manual_seed(1000 + t)
        for p in params:  # independent of the weights, so states that never see them stay comparable
            p.grad = torch.randn(p.shape, generator=g)
        if t % 3 == 2:
            params[1].grad = None
        for group in opt.param_groups:
            group["lr"] = base_lr * (0.5 + 0.5 * math.cos(math.pi * t / STEPS))
        opt.step()
        if hasattr(opt, "update_hessian") and t % 4 == 3:
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.update_hessian()
        if t == 0:
            torch._dynamo.config.error_on_recompile = True  # from here on, a new lr must not recompile


@pytest.fixture
def no_recompiles():
    yield
    torch._dynamo.config.error_on_recompile = False


@pytest.mark.parametrize("name", list(CASES))
def test_fused_step_equals_the_eager_step(name, no_recompiles):
    factory, shapes, compare = CASES[name]
    eager_p, fused_p = make(shapes), make(shapes)
    eager, compiled = factory(eager_p, False), factory(fused_p, True)
    base_lr = eager.param_groups[0]["lr"]
    train(compiled, fused_p, range(STEPS), base_lr)
    torch._dynamo.config.error_on_recompile = False
    train(eager, eager_p, range(STEPS), base_lr)
    for a, b in zip(fused_p, eager_p, strict=True):
        if compare == "exact":
            assert torch.equal(a, b), a.shape
        else:
            torch.testing.assert_close(a, b, **TOLERANCES[compare])
    for a, b in zip(fused_p, eager_p, strict=True):
        for key, value in eager.state[b].items():
            if compare == "exact" or key in EXACT_STATE.get(name, ()):
                assert torch.equal(compiled.state[a][key], value), (a.shape, key)
            else:
                torch.testing.assert_close(compiled.state[a][key], value, **TOLERANCES[compare])
    assert len(compiled.state) == len(eager.state) > 0


def test_a_checkpoint_crosses_between_the_eager_and_the_fused_step():
    """The fused flag is not part of the state: eager's state dict resumes the fused step (and back), and
    the run continues as the uninterrupted eager one, bit for bit (Lion)."""
    straight = make(SHAPES)
    opt = Lion(groups(straight), lr=3e-3)
    train(opt, straight, range(2 * 10), 3e-3)
    params = make(SHAPES)
    first = Lion(groups(params), lr=3e-3)
    train(first, params, range(10), 3e-3)
    second = Lion(groups(params), lr=3e-3, fused=True)
    second.load_state_dict(first.state_dict())
    train(second, params, range(10, 15), 3e-3)
    third = Lion(groups(params), lr=3e-3)
    third.load_state_dict(second.state_dict())
    torch._dynamo.config.error_on_recompile = False
    train(third, params, range(15, 20), 3e-3)
    assert all(torch.equal(a, b) for a, b in zip(params, straight, strict=True))
    assert "fused" not in opt.state_dict()["param_groups"][0]


# ---- the config field and `auto` ----------------------------------------------------------------------

FUSABLE = sorted(name for name, spec in load_all().items() if issubclass(spec.config, fused.FusedConfig))


def test_every_hand_written_optimizer_has_the_fused_field():
    assert FUSABLE == ["adabelief", "adamw8bit", "lamb", "lion", "muon", "schedulefree_adamw", "sophia"]


@pytest.mark.parametrize("value", ["true", "false", "auto", "True"])
def test_fused_accepts_auto_true_false(value):
    assert to_typed(compose_cfg(["optimizer=lion", f"optimizer.fused={value}"])).optimizer.fused == value.lower()


def test_a_bad_fused_value_fails_in_one_line():
    with pytest.raises(ConfigError) as info:
        to_typed(compose_cfg(["optimizer=lamb", "optimizer.fused=yes"]))
    assert str(info.value) == "optimizer.fused=yes must be auto, true or false"


def test_optimizers_without_a_fused_step_reject_the_field():
    with pytest.raises(Exception, match="fused"):
        compose_cfg(["optimizer=sgd", "optimizer.fused=true"])


TINY = MiniGPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))


@pytest.mark.parametrize("name", FUSABLE)
def test_the_builder_hands_over_the_choice(name):
    cfg = to_typed(compose_cfg([f"optimizer={name}", "optimizer.fused=true"])).optimizer
    opt = build_optimizer(TINY, cfg, BuildContext(torch.device("cpu")))
    inner = opt.optimizers[0] if name == "muon" else opt
    assert getattr(inner, "fused", None) is True or type(inner) in (FusedMuon, FusedAdamWScheduleFree)
    cfg = to_typed(compose_cfg([f"optimizer={name}", "optimizer.fused=false"])).optimizer
    opt = build_optimizer(TINY, cfg, BuildContext(torch.device("cpu")))
    inner = opt.optimizers[0] if name == "muon" else opt
    assert getattr(inner, "fused", False) is False and type(inner) not in (FusedMuon, FusedAdamWScheduleFree)


def choice(numel: int, ctx: BuildContext, value: str = "auto", **kw) -> bool:
    cfg = fused.FusedConfig(fused=value)
    return fused.resolve(cfg, [torch.empty(1).expand(numel)], ctx, "lion", **kw)


def test_auto_compiles_when_the_saving_outweighs_a_cold_compile(caplog):
    caplog.set_level(logging.INFO, logger="optim.fused")
    cpu = lambda steps: BuildContext(torch.device("cpu"), max_steps=steps)  # noqa: E731
    big = 124_000_000
    break_even = fused.COLD_COMPILE_S / (big * fused.SAVED_S_PER_PARAM)
    assert choice(big, cpu(int(break_even) + 1)) and not choice(big, cpu(int(break_even) - 1))
    assert "save" in caplog.text and "cold compile" in caplog.text
    assert not choice(800_000, cpu(2000))  # model=nano: never pays in a CPU run
    assert choice(big, cpu(None)) and not choice(800_000, cpu(None))  # run length unknown: by size
    assert not choice(big, cpu(10**6), saved_s_per_param=0.0)  # adamw8bit on a CPU
    assert not choice(big, BuildContext(torch.device("meta"), max_steps=10**6))  # not measured there
    assert "not measured on meta" in caplog.text
    assert choice(10, cpu(1), "true") and not choice(big, cpu(10**6), "false")


def test_without_a_compiler_auto_is_eager_and_true_fails_in_one_line(monkeypatch):
    monkeypatch.setattr(fused, "_has_cpp_compiler", lambda: False)
    assert not choice(10**9, BuildContext(torch.device("cpu"), max_steps=10**6))
    with pytest.raises(ValueError, match="optimizer.fused=true needs a C\\+\\+ compiler"):
        choice(10, BuildContext(torch.device("cpu")), "true")


# ---- through the trainer's loop ---------------------------------------------------------------------


def records(path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["lion", "schedulefree_adamw"])
def test_the_loop_trains_and_resumes_with_the_fused_step(name, tmp_path, corpus_file):
    """The fused step through the real loop: Lion's losses equal the eager run's bit for bit, and a run
    resumed from a checkpoint logs what the uninterrupted one did (schedule-free: through its eval-mode
    checkpoint)."""
    settings = {"optimizer": name, "trainer.max_steps": 8, "trainer.ckpt_interval": 4, "trainer.log_interval": 1,
                "trainer.eval_interval": 8, "trainer.sample_tokens": 0}  # fmt: skip
    overrides = tiny_overrides(tmp_path, corpus_file, settings)
    run(compose_cfg([*overrides, "optimizer.fused=true"]), tmp_path / "fused")
    fused_log = {r["step"]: r for r in records(tmp_path / "fused")}
    if name == "lion":
        run(compose_cfg([*overrides, "optimizer.fused=false"]), tmp_path / "eager")
        eager_log = {r["step"]: r for r in records(tmp_path / "eager")}
        assert all(fused_log[s]["train/loss"] == r["train/loss"] for s, r in eager_log.items() if "train/loss" in r)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fused" / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")
    run(compose_cfg([*overrides, "optimizer.fused=true", "trainer.resume=auto"]), resumed)
    again = {r["step"]: r for r in records(resumed)}
    for step in range(5, 9):
        assert again[step]["train/loss"] == fused_log[step]["train/loss"], step
    assert again[8]["val/loss"] == fused_log[8]["val/loss"]


def test_bench_optimizers_prints_eager_and_fused_lines(inductor_cache):
    """scripts/bench_optimizers.py (which scripts/gpu_check.sh runs with --device cuda): one JSON line per
    optimizer and step, the fused one with its difference from the eager one's weights."""
    cmd = [sys.executable, str(REPO / "scripts" / "bench_optimizers.py"), "--model", "nano", "--device", "cpu",
           "--optimizers", "lion,sgd", "--steps", "1", "--warmup", "1"]  # fmt: skip
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines[0]["baseline"] == "torch.optim.AdamW(fused=True)" and lines[0]["device"] == "cpu"
    by_name = {r["optimizer"]: r for r in lines[1:]}
    assert sorted(by_name) == ["lion", "lion+fused", "sgd"]
    assert by_name["lion+fused"]["max_abs_diff_vs_eager"] == 0.0
    assert all(r["vs_fused_adamw"] > 0 and r["ms_per_step"] > 0 for r in by_name.values())
