"""Optimizer-state statistics (optim/stats.py, each family's `stats` next to its optimizer) through the
trainer's real path: a tiny MiniGPT, a few real optimizer steps, `StatsProbe` (trainer/telemetry/probe.py) around
the last one, and every statistic recomputed here by hand with plain torch on the state tensors.

Medians come from a log10 histogram, so they are exact only to within one bin (a factor
10 ** (1 / BINS_PER_DECADE)); every other statistic is held to 1e-5 relative. Where the family's
per-coordinate step size can be checked against the step the optimizer actually made, it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, compose_cfg

from models.minigpt import GPTConfig, MiniGPT
from optim.builder import BuildContext, build_optimizer, family_stats, load_all
from optim.quantize8bit import dequantize_blockwise, quantize_blockwise
from optim.sophia import gnb_hessian_update
from optim.stats import BINS_PER_DECADE, Reducer
from trainer.config import to_typed
from trainer.telemetry.probe import StatsProbe, layer_of

REL = 1e-5
BIN = 10 ** (1 / BINS_PER_DECADE)  # a median from the histogram is within this factor
VOCAB, SEQ, BATCH = 64, 16, 4
CTX = BuildContext(torch.device("cpu"), global_batch=BATCH, tokens_per_step=BATCH * SEQ, warmup_steps=7)
DOCS = REPO / "docs" / "optimizer_stats.md"


@dataclass
class Watched:
    """The last (watched) step of a short run, with what the test recorded around it."""

    model: MiniGPT
    optimizer: torch.optim.Optimizer
    cfg: object
    stats: dict  # StatsProbe.result()
    names: list[str]
    params: list[torch.Tensor]
    before: list[torch.Tensor]  # parameters before the last step
    grads: list[torch.Tensor]  # its gradients (cloned before the step)
    updates: list[torch.Tensor]  # after - before
    previous: list[torch.Tensor]  # the step before's updates
    extra: object  # whatever `snapshot(optimizer)` returned just before the last step

    def opt(self, key: str) -> float:
        return self.stats[f"opt/{key}"]

    def state(self, key: str, optimizer: torch.optim.Optimizer | None = None) -> tuple[list[int], list[torch.Tensor]]:
        """(positions in params, state tensors) of every parameter with state[key]."""
        optimizer = optimizer or self.optimizer
        found = [(i, optimizer.state[p][key]) for i, p in enumerate(self.params) if key in optimizer.state.get(p, {})]
        return [i for i, _ in found], [s for _, s in found]

    def group(self, i: int, optimizer: torch.optim.Optimizer | None = None) -> dict:
        p = self.params[i]
        return next(g for g in (optimizer or self.optimizer).param_groups if any(q is p for q in g["params"]))


def run(name: str, *overrides: str, steps: int = 3, after_first=None, snapshot=None, wrap=None) -> Watched:
    """`steps` real optimizer steps on random tokens; the probe records the second-to-last step (record-only,
    for the previous update) and watches the last. `wrap(model)` gives the module to run forward (DDP, FSDP)."""
    cfg = to_typed(compose_cfg([f"optimizer={name}", *overrides])).optimizer
    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=2, n_embd=32))
    step_model = wrap(model) if wrap else model
    optimizer = build_optimizer(model, cfg, CTX)
    fn, previous_update = family_stats(cfg)
    probe = StatsProbe(model, optimizer, fn, previous_update)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    gen = torch.Generator().manual_seed(1)
    updates = previous = before = grads = extra = None
    for step in range(steps):
        x, y = (torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(2))
        _, loss = step_model(x, y)
        loss.backward()
        watched = step >= steps - 2
        if watched:
            probe.full = step == steps - 1
            probe.before_step()
        before = [p.detach().clone() for p in params]
        grads = [p.grad.detach().clone() for p in params]
        extra = snapshot(optimizer) if snapshot and step == steps - 1 else None
        optimizer.step()
        if watched:
            probe.after_step()
        previous, updates = updates, [p.detach() - b for p, b in zip(params, before, strict=True)]
        optimizer.zero_grad(set_to_none=True)
        if step == 0 and after_first is not None:
            after_first(model, optimizer, x)
    return Watched(model, optimizer, cfg, probe.result(), [n for n, _ in named], params, before, grads, updates,
                   previous, extra)  # fmt: skip


# ---- plain-torch references ------------------------------------------------------------------------


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def close(got: float, want: float, rel: float = REL) -> None:
    assert got == pytest.approx(float(want), rel=rel, abs=1e-30), (got, float(want))


def check_norm(w: Watched, key: str, tensors) -> None:
    close(w.opt(key), flat(tensors).norm())


def check_spread(w: Watched, key: str, tensors) -> None:
    x = flat(tensors).abs()
    close(w.opt(f"{key}/min"), x.min())
    close(w.opt(f"{key}/max"), x.max())
    median = float(x.median())
    assert median / BIN <= w.opt(f"{key}/median") <= median * BIN, (key, w.opt(f"{key}/median"), median)


def check_exact_spread(w: Watched, key: str, values: list[float]) -> None:
    v = torch.tensor(values, dtype=torch.float64)
    close(w.opt(f"{key}/min"), v.min())
    close(w.opt(f"{key}/median"), v.quantile(0.5))
    close(w.opt(f"{key}/max"), v.max())


def cosine(a, b) -> float:
    return float(F.cosine_similarity(flat(a), flat(b), dim=0))


def check_fraction(w: Watched, key: str, masks) -> None:
    m = flat(masks)
    close(w.opt(key), m.sum() / m.numel())


def check_step(update: torch.Tensor, expected: torch.Tensor, before: torch.Tensor) -> None:
    """The step the optimizer made equals `expected`, up to the float32 rounding of p + step (1 ulp of p)."""
    slack = 1e-4 * expected.abs() + 2 * torch.finfo(torch.float32).eps * before.double().abs() + 1e-12
    assert bool(((update.double() - expected).abs() <= slack).all()), (update.double() - expected).abs().max()


def adam_steps(w: Watched, positions, vs, optimizer=None) -> list[torch.Tensor]:
    """lr / (1 - beta1^t) / (sqrt(v) / sqrt(1 - beta2^t) + eps), per coordinate, in float64."""
    optimizer = optimizer or w.optimizer
    out = []
    for i, v in zip(positions, vs, strict=True):
        g, t = w.group(i, optimizer), float(optimizer.state[w.params[i]]["step"])
        (b1, b2), v = g["betas"], v.double()
        out.append(g["lr"] / (1 - b1**t) / (v.sqrt() / math.sqrt(1 - b2**t) + g["eps"]))
    return out


def check_adam(w: Watched, optimizer=None, prefix: str = "", v_key: str = "exp_avg_sq", v_name: str = "v") -> None:
    """m_norm, v_norm, v spread and step sizes of Adam-style state; the step sizes reproduce the update."""
    optimizer = optimizer or w.optimizer
    positions, ms = w.state("exp_avg", optimizer)
    _, vs = w.state(v_key, optimizer)
    check_norm(w, prefix + "m_norm", ms)
    check_norm(w, prefix + f"{v_name}_norm", vs)
    check_spread(w, prefix + v_name, vs)
    steps = adam_steps(w, positions, vs, optimizer)
    check_spread(w, prefix + "step_size", steps)
    for i, m, s in zip(positions, ms, steps, strict=True):  # update = -step_size * m - lr * wd * p (decoupled)
        g = w.group(i, optimizer)
        decay = g["lr"] * g["weight_decay"] * w.before[i].double() if w.cfg.name != "adam" else 0.0
        check_step(w.updates[i], -s * m.double() - decay, w.before[i])


# ---- registration -------------------------------------------------------------------------------------


def test_every_registered_optimizer_has_statistics():
    specs = load_all()
    assert {name for name, spec in specs.items() if spec.stats is None} == set()
    assert {name for name, spec in specs.items() if spec.stats_previous_update} == {"lion"}


def test_family_stats_with_lookahead_adds_the_fast_slow_distance():
    cfg = to_typed(compose_cfg(["optimizer=lion", "optimizer.lookahead.k=2"])).optimizer
    fn, previous = family_stats(cfg)
    assert previous and fn.keywords["inner"] is load_all()["lion"].stats
    assert family_stats(to_typed(compose_cfg(["optimizer=adamw"])).optimizer) == (load_all()["adamw"].stats, False)


SMOKE = {  # a family's statistics on the tiny model need these
    "adam": ["optimizer.lookahead.k=2"],  # and once through Lookahead
    "adamw8bit": ["optimizer.min_8bit_size=1024"],  # some tensors 8-bit
}


@pytest.mark.parametrize("name", sorted(load_all()))
def test_every_family_gives_finite_documented_statistics(name):
    w = run(name, *SMOKE.get(name, []))
    keys = {k[len("opt/") :] for k in w.stats if k.startswith("opt/")}
    assert keys, name
    assert all(math.isfinite(w.stats[f"opt/{k}"]) for k in keys), w.stats
    documented = DOCS.read_text()
    assert f"`{name}`" in documented, f"docs/optimizer_stats.md has no section naming `{name}`"
    undocumented = [k for k in keys if f"`{k}`" not in documented and f"`{k.removeprefix('adamw/')}`" not in documented]
    assert not undocumented, f"docs/optimizer_stats.md lacks rows for {name}'s {undocumented}"  # spreads as `key/min`


def test_spread_of_no_tensors_and_of_a_generator():
    out = Reducer().scoped("opt/")
    out.spread("none", [])
    out.spread("made", (torch.full((3,), float(i + 1)) for i in range(3)))  # read one at a time
    stats = out.finish()
    assert stats["opt/none/min"] == math.inf and stats["opt/none/max"] == -math.inf
    assert math.isnan(stats["opt/none/median"])
    assert stats["opt/made/min"] == 1.0 and stats["opt/made/max"] == 3.0
    assert 2 / BIN <= stats["opt/made/median"] <= 2 * BIN


# ---- per-layer statistics (the probe's own) ---------------------------------------------------------


def test_per_layer_statistics_for_sgd_where_the_update_is_minus_lr_grad():
    w = run("sgd", "optimizer.lr=0.5", "optimizer.weight_decay=0")
    lr = 0.5
    layers: dict[str, list[int]] = {"": list(range(len(w.params)))}
    for i, name in enumerate(w.names):
        layer, kind = layer_of(name)
        layers.setdefault(layer, []).append(i)
        if kind != layer:
            layers.setdefault(kind, []).append(i)
    assert {"block_00.attn", "block_01.mlp", "block_00.norm", "embedding", "final.norm", "attn", "norm"} <= set(layers)
    for layer, ix in layers.items():
        suffix = f"/{layer}" if layer else ""
        grad = flat(w.grads[i] for i in ix).norm()
        param = flat(w.before[i] for i in ix).norm()
        close(w.stats[f"grad/norm{suffix}"], grad)
        close(w.stats[f"param/norm{suffix}"], param)
        update = flat(w.updates[i] for i in ix).norm()  # lr * grad, up to the rounding of p - lr * g
        close(w.stats[f"update/norm{suffix}"], update)
        close(w.stats[f"update/norm{suffix}"], lr * grad, rel=1e-3)
        assert w.stats[f"update/ratio_log10{suffix}"] == pytest.approx(math.log10(update / param), abs=1e-6)
        assert w.stats[f"update/ratio_log10{suffix}"] == pytest.approx(math.log10(lr * grad / param), abs=1e-3)
    close(w.opt("descent_cos"), 1.0)
    assert "opt/momentum_norm" not in w.stats


# ---- each family ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nesterov", "schedulefree_adamw"])
def test_the_probe_sees_the_gradient_the_step_used(name):
    """Nesterov SGD and schedule-free AdamW change p.grad in place during the step: the probe copies it."""
    w = run(name)
    close(w.stats["grad/norm"], flat(w.grads).norm())


@pytest.mark.parametrize("name", ["momentum", "nesterov"])
def test_momentum(name):
    w = run(name, "optimizer.weight_decay=0.1")
    positions, bufs = w.state("momentum_buffer")
    assert len(positions) == len(w.params)
    check_norm(w, "momentum_norm", bufs)
    close(w.opt("cos_momentum_grad"), cosine(bufs, [w.grads[i] for i in positions]))
    close(w.opt("descent_cos"), -cosine(w.updates, w.grads))
    assert 0 < w.opt("descent_cos") < 1


def test_adagrad():
    w = run("adagrad", "optimizer.lr_decay=0.1")
    positions, sums = w.state("sum")
    check_norm(w, "v_norm", sums)
    check_spread(w, "v", sums)
    steps = []
    for i, v in zip(positions, sums, strict=True):
        g, t = w.group(i), float(w.optimizer.state[w.params[i]]["step"])
        steps.append(g["lr"] / (1 + (t - 1) * g["lr_decay"]) / (v.double().sqrt() + g["eps"]))
    check_spread(w, "step_size", steps)
    for i, s in zip(positions, steps, strict=True):  # the step the optimizer made: -step_size * g
        check_step(w.updates[i], -s * w.grads[i].double(), w.before[i])


@pytest.mark.parametrize("centered", [False, True])
def test_rmsprop(centered):
    w = run("rmsprop", f"optimizer.centered={centered}", "optimizer.momentum=0.5")
    positions, vs = w.state("square_avg")
    check_norm(w, "v_norm", vs)
    check_spread(w, "v", vs)
    steps = []
    for i, v in zip(positions, vs, strict=True):
        state, g = w.optimizer.state[w.params[i]], w.group(i)
        var = v.double() - state["grad_avg"].double() ** 2 if centered else v.double()
        steps.append(g["lr"] / (var.sqrt() + g["eps"]))
    check_spread(w, "step_size", steps)
    _, bufs = w.state("momentum_buffer")
    check_norm(w, "momentum_norm", bufs)
    close(w.opt("cos_momentum_grad"), cosine(bufs, w.grads))


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam(name):
    w = run(name, "optimizer.weight_decay=0.1")
    check_adam(w)
    assert w.opt("step_size/max") > w.opt("step_size/median") > w.opt("step_size/min") > 0


def test_adafactor():
    w = run("adafactor")
    _, rows = w.state("row_var")
    _, cols = w.state("col_var")
    assert rows and cols
    check_spread(w, "row_var", rows)
    check_spread(w, "col_var", cols)
    estimates, rms, clipped = [], [], []
    for i, p in enumerate(w.params):
        state, g = w.optimizer.state[p], w.group(i)
        eps1 = g["eps"][0] or torch.finfo(p.dtype).eps
        if "row_var" in state:
            r, c = state["row_var"].double(), state["col_var"].double()
            v = (r @ c) / r.mean(dim=-2, keepdim=True).clamp(min=eps1)
        else:
            v = state["variance"].double()
        estimates.append(v)
        u = w.grads[i].double() / v.clamp(min=eps1 * eps1).sqrt()
        rms.append(float(u.pow(2).mean().sqrt()))
        clipped.append(rms[-1] > g["d"])
    check_spread(w, "v", estimates)
    check_exact_spread(w, "update_rms", rms)
    close(w.opt("clipped_tensor_fraction"), sum(clipped) / len(clipped))


def test_muon_and_its_adamw_part():
    from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

    w = run("muon", "optimizer.weight_decay=0.1")
    muon, adamw = w.optimizer.optimizers
    positions, bufs = w.state("momentum_buffer", muon)
    assert len(positions) == 8  # qkv, proj, fc, fc-proj of 2 blocks
    check_norm(w, "momentum_norm", bufs)
    close(w.opt("cos_momentum_grad"), cosine(bufs, [w.grads[i] for i in positions]))
    sv_rms, total = [], 0.0
    for i, buf in zip(positions, bufs, strict=True):
        g = w.group(i, muon)
        # torch.optim.Muon: O = NS(g.lerp(buf, momentum)) with the buffer after this step (Nesterov)
        ortho = _zeropower_via_newtonschulz(
            w.grads[i].lerp(buf, g["momentum"]), g["ns_coefficients"], g["ns_steps"], g["eps"]
        ).double()
        step = -g["lr"] * g["weight_decay"] * w.before[i].double() - _adjust_lr(g["lr"], None, buf.shape) * ortho
        check_step(w.updates[i], step, w.before[i])  # the step Muon made
        total += float(ortho.pow(2).sum())
        sv_rms.append(float(ortho.norm()) / math.sqrt(min(buf.shape)))
    close(w.opt("ortho_norm"), math.sqrt(total))
    check_exact_spread(w, "ortho_sv_rms", sv_rms)
    assert 0.5 < w.opt("ortho_sv_rms/median") < 1.5
    check_adam(w, adamw, prefix="adamw/")


def test_lion():
    w = run("lion")
    check_norm(w, "m_norm", w.state("exp_avg")[1])
    check_fraction(w, "sign_agreement", [u * g < 0 for u, g in zip(w.updates, w.grads, strict=True)])
    check_fraction(w, "flip_rate", [u * q < 0 for u, q in zip(w.updates, w.previous, strict=True)])
    assert 0.5 < w.opt("sign_agreement") < 1 and 0 < w.opt("flip_rate") < 0.5


def test_lion_without_a_previous_update_has_no_flip_rate():
    cfg = to_typed(compose_cfg(["optimizer=lion"])).optimizer
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = build_optimizer(model, cfg, CTX)
    probe = StatsProbe(model, optimizer, *family_stats(cfg))
    model(torch.randn(5, 4)).square().sum().backward()
    probe.before_step()
    optimizer.step()
    probe.after_step()
    stats = probe.result()
    assert "opt/sign_agreement" in stats and "opt/flip_rate" not in stats


def test_lamb():
    w = run("lamb", "optimizer.weight_decay=0.1")
    positions, ms = w.state("exp_avg")
    ratios = []
    for i, m in zip(positions, ms, strict=True):
        state, g = w.optimizer.state[w.params[i]], w.group(i)
        t, (b1, b2) = float(state["step"]), g["betas"]
        r = (m.double() / (1 - b1**t)) / (state["exp_avg_sq"].double().sqrt() / math.sqrt(1 - b2**t) + g["eps"])
        r = r + g["weight_decay"] * w.before[i].double()
        p_norm, r_norm = w.before[i].double().norm(), r.norm()
        ratio = float(p_norm / r_norm) if p_norm > 0 and r_norm > 0 else 1.0
        ratios.append(ratio)
        check_step(w.updates[i], -g["lr"] * ratio * r, w.before[i])
    check_exact_spread(w, "trust_ratio", ratios)
    close(w.opt("trust_ratio/mean"), sum(ratios) / len(ratios))
    assert len(set(ratios)) == len(ratios)


def test_adabelief():
    w = run("adabelief")
    check_adam(w, v_key="exp_avg_var", v_name="s")


def test_sophia():
    def refresh(model, optimizer, x):  # the trainer's hook: one Gauss-Newton-Bartlett Hessian estimate
        gnb_hessian_update(model, optimizer, x)

    w = run("sophia", "optimizer.rho=50", after_first=refresh)  # rho so that about half the steps clip
    positions, ms = w.state("exp_avg")
    _, hs = w.state("hessian")
    check_norm(w, "m_norm", ms)
    check_norm(w, "hessian_norm", hs)
    check_spread(w, "hessian", hs)
    masks = []
    for i, m, h in zip(positions, ms, hs, strict=True):
        g = w.group(i)
        masks.append(m.abs() >= h * (g["rho"] * g["bs"]) + 1e-15)
    check_fraction(w, "clipped_fraction", masks)
    assert 0 < w.opt("clipped_fraction") < 1


def test_sophia_before_any_hessian_refresh_clips_everything():
    w = run("sophia", steps=2)
    assert w.opt("hessian_norm") == 0.0 and w.opt("clipped_fraction") == 1.0


def test_adamw8bit():
    w = run("adamw8bit", "optimizer.min_8bit_size=1024", "optimizer.block_size=64")
    ms, vs, errors = [], [], {"m": [0.0, 0.0], "v": [0.0, 0.0]}
    quantised = 0
    for i, p in enumerate(w.params):
        state, g, n = w.optimizer.state[p], w.group(i), p.numel()
        if "exp_avg" in state:
            ms.append(state["exp_avg"])
            vs.append(state["exp_avg_sq"])
            continue
        quantised += 1
        m = dequantize_blockwise(state["exp_avg_codes"], state["exp_avg_absmax"], True, 64)[:n]
        v = dequantize_blockwise(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], False, 64)[:n]
        ms.append(m.view(p.shape))
        vs.append(v.view(p.shape))
        (b1, b2), grad = g["betas"], w.grads[i].reshape(-1)
        for key, x, signed in (("m", b1 * m + (1 - b1) * grad, True), ("v", b2 * v + (1 - b2) * grad * grad, False)):
            back = dequantize_blockwise(*quantize_blockwise(x, signed, 64), signed=signed, block_size=64)
            errors[key][0] += float((x.double() - back.double()).pow(2).sum())
            errors[key][1] += float(x.double().pow(2).sum())
    assert 0 < quantised < len(w.params)
    check_norm(w, "m_norm", ms)
    check_norm(w, "v_norm", vs)
    check_spread(w, "v", vs)
    check_spread(w, "step_size", adam_steps(w, range(len(w.params)), vs))
    for key, (err, total) in errors.items():
        close(w.opt(f"quant_error_rel/{key}"), math.sqrt(err / total), rel=1e-4)
        assert 0 < w.opt(f"quant_error_rel/{key}") < 0.05


def test_schedulefree():
    def z_before(optimizer):
        return [optimizer.state[p]["z"].clone() for g in optimizer.param_groups for p in g["params"]]

    w = run("schedulefree_adamw", "optimizer.weight_decay=0", snapshot=z_before)
    positions, zs = w.state("z")
    assert len(positions) == len(w.params)
    gap = flat(w.params).sub(flat(zs)).norm()
    close(w.opt("yz_gap"), gap)
    close(w.opt("yz_gap_rel"), gap / flat(w.params).norm())
    _, vs = w.state("exp_avg_sq")
    check_spread(w, "v", vs)
    steps = []
    for i, v in zip(positions, vs, strict=True):
        g = w.group(i)
        k, b2 = g["k"], g["betas"][1]  # steps taken, this one included
        assert k == 3
        steps.append(g["lr"] * min(1.0, k / CTX.warmup_steps) / ((v.double() / (1 - b2**k)).sqrt() + g["eps"]))
    check_spread(w, "step_size", steps)
    order = [p for g in w.optimizer.param_groups for p in g["params"]]
    for i, z, s in zip(positions, zs, steps, strict=True):  # z's step: -step_size * g (no weight decay)
        z0 = w.extra[next(k for k, p in enumerate(order) if p is w.params[i])]
        check_step(z - z0, -s * w.grads[i].double(), z0)


def test_lookahead_adds_the_fast_slow_distance_to_the_inner_family():
    w = run("adamw", "optimizer.lookahead.k=2")  # 3 steps: synchronised after the 2nd, one step since
    check_adam(w, w.optimizer.inner)
    _, slow = w.state("slow_param")
    distance = flat(w.params).sub(flat(slow)).norm()
    close(w.opt("fast_slow_distance"), distance)
    close(w.opt("fast_slow_rel"), distance / flat(slow).norm())
    assert w.opt("steps_since_sync") == 1.0 and distance > 0
    synced = run("adamw", "optimizer.lookahead.k=3")
    assert synced.opt("fast_slow_distance") == 0.0 and synced.opt("steps_since_sync") == 0.0


def test_docs_describe_every_family():
    text = DOCS.read_text()
    for spec in load_all().values():
        assert f"`{spec.name}`" in text, spec.name
    assert "Lookahead" in text


def test_lion_flip_rate_at_stats_interval_one():
    """Every step watched in full: each step's update is the next one's previous update."""
    from optim.lion import Lion

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    optimizer = Lion(model.parameters(), lr=1e-2)
    probe = StatsProbe(model, optimizer, *family_stats(compose_cfg(["optimizer=lion"]).optimizer))
    x = torch.randn(16, 8)
    updates, results = [], []
    for step in (1, 2, 3):
        assert probe.wants(step, 1) and probe.full
        model(x).pow(2).mean().backward()
        probe.before_step()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        probe.after_step()
        updates.append([p.detach() - b for p, b in zip(model.parameters(), before, strict=True)])
        optimizer.zero_grad()
        results.append(probe.result())
    assert "opt/flip_rate" not in results[0]
    flips = sum((a * b < 0).sum() for a, b in zip(*updates[1:], strict=True))
    total = sum(a.numel() for a in updates[2])
    assert results[2]["opt/flip_rate"] == pytest.approx(float(flips / total), rel=1e-6)
