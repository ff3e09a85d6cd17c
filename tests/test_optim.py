"""Optimizer builder: every torch.optim-backed option builds that class with its configured
hyperparameters; parameter groups; Muon's split; lr scaling; invalid hyperparameters."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import compose_cfg

from models.minigpt import GPTConfig, MiniGPT
from optim.builder import BuildContext, build_optimizer, eval_mode, load_all, param_groups
from optim.combined import CombinedOptimizer
from trainer.config import to_typed
from trainer.errors import ConfigError

CPU = BuildContext(torch.device("cpu"), global_batch=32, tokens_per_step=32 * 128, warmup_steps=7)


def model() -> MiniGPT:
    torch.manual_seed(0)
    return MiniGPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))


def build(*overrides: str, ctx: BuildContext = CPU):
    cfg = to_typed(compose_cfg(list(overrides))).optimizer
    return build_optimizer(model(), cfg, ctx), cfg


def test_decay_groups_split_matrices_from_biases_and_norms():
    m = model()
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))  # tied weight once, nothing missed
    assert any(p is m.wte.weight for p in decay["params"])
    assert any(p is m.ln_f.weight for p in no_decay["params"])


TORCH_BACKED = {
    # name: (class, overrides, expected group values)
    "sgd": (torch.optim.SGD, ["optimizer.lr=0.3"], {"lr": 0.3, "momentum": 0.0, "nesterov": False}),
    "momentum": (torch.optim.SGD, ["optimizer.momentum=0.8"], {"lr": 0.05, "momentum": 0.8, "nesterov": False}),
    "nesterov": (torch.optim.SGD, [], {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    "adagrad": (torch.optim.Adagrad, ["optimizer.eps=1e-9"], {"lr": 1e-2, "eps": 1e-9, "lr_decay": 0.0}),
    "rmsprop": (torch.optim.RMSprop, ["optimizer.alpha=0.9"], {"lr": 1e-3, "alpha": 0.9, "eps": 1e-8}),
    "adam": (torch.optim.Adam, ["optimizer.betas=[0.8,0.99]"], {"lr": 1e-3, "betas": (0.8, 0.99), "fused": True}),
    "adamw": (
        torch.optim.AdamW,
        ["optimizer.lr=3e-4", "optimizer.eps=1e-6"],
        {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-6, "weight_decay": 0.1, "fused": True},
    ),  # fmt: skip
    "adafactor": (
        torch.optim.Adafactor,
        ["optimizer.beta2_decay=-0.5"],
        {"lr": 1e-2, "beta2_decay": -0.5, "eps": (None, 1e-3), "d": 1.0},
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", list(TORCH_BACKED))
def test_torch_backed_option_builds_that_class(name):
    cls, overrides, expected = TORCH_BACKED[name]
    opt, cfg = build(f"optimizer={name}", *overrides)
    assert type(opt) is cls
    decay_group = opt.param_groups[0]
    for key, value in expected.items():
        assert decay_group[key] == value, key
    assert decay_group["weight_decay"] == cfg.weight_decay and opt.param_groups[1]["weight_decay"] == 0.0


def test_adamw_impl_choices():
    assert build("optimizer.impl=foreach")[0].param_groups[0]["foreach"] is True
    assert build("optimizer.impl=for_loop")[0].param_groups[0]["foreach"] is False


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    opt, cfg = build("optimizer=muon", "optimizer.lr=0.03", "optimizer.adamw_lr=2e-3")
    assert isinstance(opt, CombinedOptimizer)
    muon, adamw = opt.optimizers
    assert type(muon) is torch.optim.Muon and type(adamw) is torch.optim.AdamW
    hidden = [p for g in muon.param_groups for p in g["params"]]
    assert hidden and all(p.dim() == 2 for p in hidden)
    m = model()
    n_hidden = sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and n.startswith("h."))
    assert sum(p.numel() for p in hidden) == n_hidden  # every block matrix, no embedding
    rest = [p for g in adamw.param_groups for p in g["params"]]
    assert sum(p.numel() for p in hidden + rest) == m.num_params()
    assert muon.param_groups[0]["lr"] == 0.03 and muon.param_groups[0]["momentum"] == 0.95
    assert adamw.param_groups[0]["lr"] == 2e-3
    assert [g["lr"] for g in opt.param_groups] == [0.03, 2e-3, 2e-3]  # one list the scheduler drives


def test_muon_combined_state_round_trips():
    opt, _ = build("optimizer=muon")
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state_dict()
    again, _ = build("optimizer=muon")
    again.load_state_dict(state)
    assert len(again.optimizers[0].state) == len(opt.optimizers[0].state) > 0


def test_schedulefree_is_the_package_class_in_train_mode():
    from schedulefree import AdamWScheduleFree

    opt, _ = build("optimizer=schedulefree_adamw", "optimizer.lr=2e-3")
    assert type(opt) is AdamWScheduleFree
    g = opt.param_groups[0]
    assert (g["lr"], g["warmup_steps"], g["train_mode"]) == (2e-3, CPU.warmup_steps, True)


def test_linear_lr_scaling_with_the_global_batch(caplog):
    caplog.set_level(logging.INFO)
    big = BuildContext(torch.device("cpu"), global_batch=128)
    opt, _ = build("optimizer.scale_lr=true", "optimizer.reference_batch=32", ctx=big)
    assert opt.param_groups[0]["lr"] == pytest.approx(4e-3)
    assert "lr scaling" in caplog.text
    unscaled, _ = build(ctx=big)
    assert unscaled.param_groups[0]["lr"] == 1e-3


def test_every_registered_optimizer_has_a_yaml():
    from conftest import REPO

    yamls = {p.stem for p in (REPO / "configs" / "optimizer").glob("*.yaml")}
    assert set(load_all()) == yamls


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optimizer.lr=0"], "optimizer.lr"),
        (["optimizer.lr=-1"], "optimizer.lr"),
        (["optimizer.eps=-1e-8"], "optimizer.eps"),
        (["optimizer.betas=[0.9,1.0]"], "optimizer.betas"),
        (["optimizer.weight_decay=-0.1"], "weight_decay"),
        (["optimizer=momentum", "optimizer.momentum=1.0"], "optimizer.momentum"),
        (["optimizer=rmsprop", "optimizer.alpha=1.5"], "optimizer.alpha"),
        (["optimizer=muon", "optimizer.ns_steps=0"], "ns_steps"),
        (["optimizer=muon", "optimizer.adamw_betas=[1.0,0.9]"], "adamw_betas"),
        (["optimizer.lookahead.k=0"], "lookahead.k"),
        (["optimizer.lookahead.k=5", "optimizer.lookahead.alpha=1.5"], "lookahead.alpha"),
        (["optimizer.scale_lr=true", "optimizer.reference_batch=0"], "reference_batch"),
        (["optimizer.name=sgd"], "optimizer=sgd"),
    ],
)
def test_invalid_hyperparameters_fail_with_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        to_typed(compose_cfg(overrides))
    assert "\n" not in str(info.value)


def test_unknown_optimizer_key_is_rejected():
    with pytest.raises(Exception, match="momentum"):
        compose_cfg(["optimizer=adamw", "optimizer.momentum=0.9"])  # AdamW has no momentum field


def test_schedulefree_switches_to_its_average_for_eval_and_back():
    m = model()
    cfg = to_typed(compose_cfg(["optimizer=schedulefree_adamw"])).optimizer
    opt = build_optimizer(m, cfg, CPU)
    x = torch.randint(0, 64, (2, 16))
    for _ in range(3):
        m(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    training = [p.detach().clone() for p in m.parameters()]
    with eval_mode(opt, cfg):
        assert opt.param_groups[0]["train_mode"] is False
        assert any(not torch.equal(p, q) for p, q in zip(m.parameters(), training, strict=True))  # x, not y
    assert opt.param_groups[0]["train_mode"] is True
    for p, q in zip(m.parameters(), training, strict=True):
        torch.testing.assert_close(p, q)  # back at the training iterate


def test_sophia_hook_refreshes_the_hessian_every_k_steps():
    from optim.builder import HookContext, build_hook

    m = model()
    cfg = to_typed(compose_cfg(["optimizer=sophia", "optimizer.hessian_interval=2"])).optimizer
    opt = build_optimizer(m, cfg, CPU)
    calls = []
    upcoming = lambda n: (calls.append(n), [(torch.randint(0, 64, (2, 16)),) * 2] * n)[1]  # noqa: E731
    hook = build_hook(m, opt, cfg, HookContext(upcoming, torch.autocast("cpu", enabled=False), n_micro=3))
    hook(1)
    assert not calls
    hook(2)
    assert calls == [3]  # the coming step's whole batch
    hessians = [opt.state[p]["hessian"] for p in m.parameters()]
    assert all(h.sum() > 0 for h in hessians) and all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize(
    "optimizer, override, message",
    [
        ("momentum", "optimizer.momentum=1.0", "optimizer.momentum=1.0 must be in [0, 1)"),
        ("sgd", "optimizer.dampening=2", "optimizer.dampening=2.0 must be in [0, 1]"),
        ("adagrad", "optimizer.lr_decay=-1", "optimizer.lr_decay=-1.0 must be >= 0"),
        ("rmsprop", "optimizer.alpha=1.0", "optimizer.alpha=1.0 must be in [0, 1)"),
        ("adamw", "optimizer.impl=fast", "optimizer.impl=fast must be auto, fused, foreach or for_loop"),
        ("adafactor", "optimizer.beta2_decay=0.5", "optimizer.beta2_decay=0.5 must be <= 0"),
        ("muon", "optimizer.adamw_lr=0", "optimizer.adamw_lr=0.0 must be > 0"),
        ("muon", "optimizer.adjust_lr_fn=rms", "optimizer.adjust_lr_fn=rms must be null, original or match_rms_adamw"),
        (
            "muon",
            "optimizer.adamw_betas=[0.9,1.0]",
            "optimizer.adamw_betas=[0.9, 1.0] must be two numbers in [0, 1), e.g. [0.9,0.95]",
        ),
        ("soap", "optimizer.precondition_frequency=0", "optimizer.precondition_frequency=0 must be >= 1"),
        ("soap", "optimizer.shampoo_beta=1.0", "optimizer.shampoo_beta=1.0 must be in [0, 1)"),
        ("sophia", "optimizer.hessian_interval=0", "optimizer.hessian_interval=0 must be >= 1"),
        ("adamw8bit", "optimizer.block_size=100", "optimizer.block_size=100 must be a power of two >= 2"),
        ("schedulefree_adamw", "optimizer.r=-1", "optimizer.r=-1.0 must be >= 0"),
        ("lion", "optimizer.reference_batch=0", "optimizer.reference_batch=0 must be >= 1"),
        ("lamb", "optimizer.lookahead.alpha=0", "optimizer.lookahead.alpha=0.0 must be in (0, 1]"),
    ],
)
def test_each_config_checks_its_own_fields_before_training(optimizer, override, message):
    """The checks live on the config classes (validate()); the run refuses with their one line."""
    with pytest.raises(ConfigError) as info:
        to_typed(compose_cfg([f"optimizer={optimizer}", override]))
    assert str(info.value) == message


def test_registering_a_name_twice_is_an_error():
    from optim.builder import REGISTRY, register

    before = REGISTRY["adamw"]
    with pytest.raises(ValueError, match="'adamw' is registered twice"):
        register("adamw", before.config, before.state_bytes, search_space={})(lambda model, cfg, ctx: None)
    assert REGISTRY["adamw"] is before


def test_every_spec_has_a_search_space_of_its_own_fields():
    for name, spec in load_all().items():
        fields = set(spec.config.__dataclass_fields__)
        assert "optimizer.lr" in spec.search_space, name
        for key in spec.space():
            assert key.startswith("schedule.") or key.split(".")[1] in fields, (name, key)
