"""Lion, LAMB and AdaBelief (optim/lion.py, optim/lamb.py, optim/adabelief.py) beside their reference
implementations (lion-pytorch, pytorch_optimizer), exact resume, and hyperparameter checks. Every
reference test runs on both steps: the foreach one (fused=False) and the compiled one (fused=True,
optim/fused.py; tests/test_fused_optimizers.py compares the two directly)."""

from __future__ import annotations

import math

import pytest
import torch

from optim.adabelief import AdaBelief
from optim.lamb import Lamb
from optim.lion import Lion


def reference(module: str):
    """The reference package, or a skip: only when it is not installed can the comparison not run."""
    return pytest.importorskip(module, reason=f"the reference package {module!r} is not installed")


STEPS = 60
# Two param groups as the trainer builds them: a decay group and a no-decay group.
DECAY_SHAPES = [(16, 24), (4, 8, 6), (7,)]
NO_DECAY_SHAPES = [(7,), (24,)]
RTOL, ATOL = 1e-6, 1e-6  # measured worst case: 4.8e-7 absolute (LAMB), 1.2e-7 (AdaBelief), 0 (Lion)
FUSED = pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
pytestmark = pytest.mark.usefixtures("inductor_cache")  # the fused cases compile once per session


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: with several threads, the fused Adam kernel under LAMB spends its time
    forking and joining OpenMP workers (tens of ms per step on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_params(seed: int = 0, zero_last: bool = False) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    groups = [[torch.randn(s, generator=g) for s in shapes] for shapes in (DECAY_SHAPES, NO_DECAY_SHAPES)]
    if zero_last:  # a zero-initialised bias, as in GPT-2: exercises LAMB's ||p|| = 0 branch
        groups[1][-1].zero_()
    return [[torch.nn.Parameter(t) for t in ts] for ts in groups]


def clone_params(groups: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    return [[torch.nn.Parameter(p.detach().clone()) for p in ps] for ps in groups]


def param_groups(groups: list[list[torch.Tensor]], weight_decay: float) -> list[dict]:
    return [{"params": groups[0], "weight_decay": weight_decay}, {"params": groups[1], "weight_decay": 0.0}]


def grads_for(groups: list[list[torch.Tensor]], step: int, scale: float = 1.0) -> list[list[torch.Tensor]]:
    """Gradients for one step: noise plus a pull towards zero, the same for every optimizer fed."""
    g = torch.Generator().manual_seed(100_003 + step)
    return [[scale * (0.1 * p.detach() + torch.randn(p.shape, generator=g)) for p in ps] for ps in groups]


def lr_at(step: int, base: float) -> float:
    """A changing lr, as a scheduler would set group['lr'] every step."""
    return base * (0.55 + 0.45 * math.cos(math.pi * step / STEPS))


def set_grads(groups: list[list[torch.Tensor]], grads: list[list[torch.Tensor]]) -> None:
    for ps, gs in zip(groups, grads, strict=True):
        for p, g in zip(ps, gs, strict=True):
            p.grad = g.clone()


def flat(groups: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [p.detach() for ps in groups for p in ps]


def assert_all_close(ours: list[list[torch.Tensor]], ref: list[list[torch.Tensor]]) -> None:
    for a, b in zip(flat(ours), flat(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def run_side_by_side(ours_opt, ours, ref_opt, ref, base_lr: float, before_ref_step=None, grad_scale=1.0) -> None:
    for step in range(1, STEPS + 1):
        grads = grads_for(ours, step, grad_scale)
        lr = lr_at(step, base_lr)
        for opt, groups in ((ours_opt, ours), (ref_opt, ref)):
            for group in opt.param_groups:
                group["lr"] = lr
            set_grads(groups, grads)
        if before_ref_step is not None:
            before_ref_step(ref_opt, step)
        ours_opt.step()
        ref_opt.step()


# ---------------------------------------------------------------------------------------------------
# Beside the references


@FUSED
@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_lion_matches_lion_pytorch(weight_decay, fused):
    ours = make_params()
    ref = clone_params(ours)
    hp = dict(lr=3e-3, betas=(0.9, 0.99))
    ours_opt = Lion(param_groups(ours, weight_decay), **hp, fused=fused)
    # use_triton=False: the plain PyTorch update; decoupled_weight_decay=False: p *= 1 - lr * wd (the paper's).
    ref_opt = reference("lion_pytorch").Lion(
        param_groups(ref, weight_decay), **hp, use_triton=False, decoupled_weight_decay=False
    )
    run_side_by_side(ours_opt, ours, ref_opt, ref, hp["lr"])
    # Both compute p * (1 - lr * wd) - lr * sign(u) with the same two ops, so the parameters agree bit for
    # bit as long as every sign agrees; m differs in the last bits (lerp here, mul + add there).
    for a, b in zip(flat(ours), flat(ref), strict=True):
        assert torch.equal(a, b)
    for p, q in zip(sum(ours, []), sum(ref, []), strict=True):
        torch.testing.assert_close(ours_opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"], rtol=RTOL, atol=ATOL)


@FUSED
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_adabelief_matches_pytorch_optimizer(weight_decay, eps, fused):
    ours = make_params()
    ref = clone_params(ours)
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=eps)
    ours_opt = AdaBelief(param_groups(ours, weight_decay), **hp, fused=fused)
    # weight_decouple=True, fixed_decay=False: p *= 1 - lr * wd; rectify=False: no RAdam rectification;
    # ams_bound=False: no running max of s. (maximize=False and no adanorm by default.)
    ref_opt = reference("pytorch_optimizer").AdaBelief(
        param_groups(ref, weight_decay), **hp, weight_decouple=True, fixed_decay=False, rectify=False, ams_bound=False
    )
    run_side_by_side(ours_opt, ours, ref_opt, ref, hp["lr"])
    assert_all_close(ours, ref)
    for p, q in zip(sum(ours, []), sum(ref, []), strict=True):
        torch.testing.assert_close(
            ours_opt.state[p]["exp_avg_var"], ref_opt.state[q]["exp_avg_var"], rtol=RTOL, atol=ATOL
        )


@FUSED
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("grad_scale", [1.0, 1e-5])  # 1e-5: sqrt(v) ~ eps, so where eps enters matters
def test_lamb_matches_pytorch_optimizer(weight_decay, grad_scale, fused):
    """pytorch_optimizer.Lamb computes r' = m / (sqrt(v) + eps') + wd' * p without bias corrections and
    steps p -= lr * ||p|| / (||r'|| + eps') * r'. The paper's r is c * (m / (sqrt(v) + eps * sqrt(bc2))
    + (wd / c) * p) with c = sqrt(bc2) / bc1, and the trust-ratio step is invariant to the scale of r; so
    with eps' = eps * sqrt(bc2) and wd' = wd / c set on the reference's groups before each step, the
    reference takes the paper's step (up to eps' in its trust-ratio denominator, ~1e-7 relative)."""
    ours = make_params(seed=3)
    ref = clone_params(ours)
    eps = 1e-6
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=eps)
    ours_opt = Lamb(param_groups(ours, weight_decay), **hp, fused=fused)
    # weight_decouple=False: wd * p inside r (the paper's); adam=False: apply the trust ratio;
    # pre_norm=False: no global gradient rescaling; grad_averaging=True: m uses (1 - beta1) * g;
    # rectify=False: no RAdam rectification; adam_debias=True: step size lr (not lr / bc1).
    ref_opt = reference("pytorch_optimizer").Lamb(
        param_groups(ref, weight_decay), **hp, weight_decouple=False, adam=False, pre_norm=False,
        grad_averaging=True, rectify=False, adam_debias=True,
    )  # fmt: skip
    ref_opt.clamp = math.inf  # the reference clamps ||p|| at 10; the paper does not

    def rescale_reference(opt, step):
        beta1, beta2 = hp["betas"]
        bc2_sqrt = math.sqrt(1.0 - beta2**step)
        c = bc2_sqrt / (1.0 - beta1**step)
        for group, wd in zip(opt.param_groups, (weight_decay, 0.0), strict=True):
            group["eps"] = eps * bc2_sqrt
            group["weight_decay"] = wd / c

    run_side_by_side(ours_opt, ours, ref_opt, ref, hp["lr"], before_ref_step=rescale_reference, grad_scale=grad_scale)
    assert_all_close(ours, ref)


def paper_lamb_step(params, grads, state, *, lr, betas, eps, weight_decay):
    """Algorithm 2 of You et al. 2020, literally, one tensor at a time (float64 for a sharp reference)."""
    for p, g in zip(params, grads, strict=True):
        if g is None:
            continue
        if p not in state:
            state[p] = {
                "t": 0,
                "m": torch.zeros_like(p, dtype=torch.float64),
                "v": torch.zeros_like(p, dtype=torch.float64),
            }
        s = state[p]
        s["t"] += 1
        (beta1, beta2), t, g = betas, s["t"], g.double()
        s["m"] = beta1 * s["m"] + (1 - beta1) * g
        s["v"] = beta2 * s["v"] + (1 - beta2) * g * g
        m_hat = s["m"] / (1 - beta1**t)
        v_hat = s["v"] / (1 - beta2**t)
        x = p.detach().double()
        r = m_hat / (v_hat.sqrt() + eps) + weight_decay * x
        w_norm, r_norm = x.norm(), r.norm()
        trust = (w_norm / r_norm).item() if w_norm > 0 and r_norm > 0 else 1.0
        p.data.copy_(x - lr * trust * r)


@FUSED
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lamb_matches_the_paper_literally(weight_decay, fused):
    """Against Algorithm 2 written out per tensor, with a zero-initialised bias (trust ratio 1 on its
    first step) and one parameter that has no gradient on some steps (so its own step count and bias
    corrections lag behind the others' in the same group)."""
    ours = make_params(seed=5, zero_last=True)
    ref = clone_params(ours)
    hp = dict(betas=(0.9, 0.999), eps=1e-3)
    opt = Lamb(param_groups(ours, weight_decay), lr=1e-2, **hp, fused=fused)
    run_with_gaps(opt, ours, ref, paper_lamb_step, hp, weight_decay)
    assert opt.state[ours[1][0]]["step"].item() == STEPS - STEPS // 3


def run_with_gaps(opt, ours, ref, literal_step, hp, weight_decay):
    """STEPS steps of `opt` on `ours` and of `literal_step` on `ref`; the first no-decay parameter has no
    gradient every third step."""
    state: dict = {}
    for step in range(1, STEPS + 1):
        grads = grads_for(ours, step)
        if step % 3 == 0:
            grads[1][0] = None  # no gradient this step
        lr = lr_at(step, 1e-2)
        for group in opt.param_groups:
            group["lr"] = lr
        for ps, gs in zip(ours, grads, strict=True):
            for p, g in zip(ps, gs, strict=True):
                p.grad = None if g is None else g.clone()
        opt.step()
        literal_step(ref[0], grads[0], state, lr=lr, **hp, weight_decay=weight_decay)
        literal_step(ref[1], grads[1], state, lr=lr, **hp, weight_decay=0.0)
    assert_all_close(ours, ref)


def paper_adabelief_step(params, grads, state, *, lr, betas, eps, weight_decay):
    """Algorithm 2 of Zhuang et al. 2020 with decoupled weight decay, literally, one tensor at a time."""
    for p, g in zip(params, grads, strict=True):
        if g is None:
            continue
        if p not in state:
            state[p] = {
                "t": 0,
                "m": torch.zeros_like(p, dtype=torch.float64),
                "s": torch.zeros_like(p, dtype=torch.float64),
            }
        st = state[p]
        st["t"] += 1
        (beta1, beta2), t, g = betas, st["t"], g.double()
        x = p.detach().double() * (1 - lr * weight_decay)
        st["m"] = beta1 * st["m"] + (1 - beta1) * g
        st["s"] = beta2 * st["s"] + (1 - beta2) * (g - st["m"]) ** 2 + eps
        denom = st["s"].sqrt() / math.sqrt(1 - beta2**t) + eps
        p.data.copy_(x - lr / (1 - beta1**t) * st["m"] / denom)


@FUSED
def test_adabelief_matches_the_paper_with_per_tensor_steps(fused):
    """A parameter that misses steps keeps its own bias corrections (the reference counts steps per group,
    so this is checked against the algorithm written out per tensor)."""
    ours = make_params(seed=6)
    ref = clone_params(ours)
    hp = dict(betas=(0.9, 0.999), eps=1e-3)
    opt = AdaBelief(param_groups(ours, 0.1), lr=1e-2, **hp, fused=fused)
    run_with_gaps(opt, ours, ref, paper_adabelief_step, hp, 0.1)
    assert opt.state[ours[1][0]]["step"].item() == STEPS - STEPS // 3


# ---------------------------------------------------------------------------------------------------
# Exact resume, state dict, validation

OPTIMIZERS = {
    "lion": (Lion, dict(lr=3e-3)),
    "lamb": (Lamb, dict(lr=1e-2)),
    "adabelief": (AdaBelief, dict(lr=1e-2)),
}


def train(opt, groups, steps, start=0):
    for step in range(start + 1, start + steps + 1):
        set_grads(groups, grads_for(groups, step))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, opt.defaults["lr"])
        opt.step()


@FUSED
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_is_bit_exact(name, tmp_path, fused):
    cls, hp = OPTIMIZERS[name]
    hp = {**hp, "fused": fused}
    n = 10
    straight = make_params(seed=7, zero_last=True)
    resumed = clone_params(straight)

    opt = cls(param_groups(straight, 0.1), **hp)
    train(opt, straight, 2 * n)

    first = cls(param_groups(resumed, 0.1), **hp)
    train(first, resumed, n)
    torch.save(first.state_dict(), tmp_path / "opt.pt")
    saved = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for st in saved["state"].values() for v in st.values())
    del first

    fresh = clone_params(resumed)
    second = cls(param_groups(fresh, 0.1), **hp)
    second.load_state_dict(saved)
    train(second, fresh, n, start=n)

    for a, b in zip(flat(straight), flat(fresh), strict=True):
        assert torch.equal(a, b)
    ref_state, new_state = opt.state_dict()["state"], second.state_dict()["state"]
    assert ref_state.keys() == new_state.keys()
    for k in ref_state:
        for key, value in ref_state[k].items():
            assert torch.equal(value, new_state[k][key]), (k, key)


@FUSED
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_skips_params_without_grad_and_leaves_grads_untouched(name, fused):
    cls, hp = OPTIMIZERS[name]
    hp = {**hp, "fused": fused}
    groups = make_params()
    frozen = groups[0][0]  # in the decay group: not even decayed while it has no gradient
    opt = cls(param_groups(groups, 0.1), **hp)
    train(opt, groups, 1)
    set_grads(groups, grads_for(groups, 2))
    frozen.grad = None
    before = frozen.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[frozen].items()}
    with_grad = [p for ps in groups for p in ps if p.grad is not None]
    grads_before = [p.grad.clone() for p in with_grad]
    opt.step()
    assert torch.equal(frozen, before)
    assert all(torch.equal(opt.state[frozen][k], v) for k, v in state_before.items())
    assert all(torch.equal(p.grad, g) for p, g in zip(with_grad, grads_before, strict=True))


BAD = [
    (dict(lr=-1e-3), "lr"),
    (dict(betas=(1.0, 0.99)), "betas"),
    (dict(betas=(0.9, -0.1)), "betas"),
    (dict(betas=(0.9,)), "betas"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(eps=-1e-8), "eps"),
]


@pytest.mark.parametrize(
    "name, kwargs, match",
    [(name, kw, m) for name in OPTIMIZERS for kw, m in BAD if not (name == "lion" and "eps" in kw)],  # Lion has no eps
)
def test_bad_hyperparameters_raise(name, kwargs, match):
    cls, hp = OPTIMIZERS[name]
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=match):
        cls([p], **{**hp, **kwargs})
    with pytest.raises(ValueError, match=match):  # the same check for a param group's own values
        cls([{"params": [p], **kwargs}], **hp)
