"""MiniGPT's architecture options (norm, mlp, qk_norm, bias, tie_embeddings, z_loss, logit_softcap): the
defaults equal the previous model bit for bit; each option has the right shapes, stays causal, learns,
is counted by the FLOPs formula, the memory report and the statistics' layer names, and refuses bad values."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg
from hydra.errors import ConfigCompositionException
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import models.minigpt as current
from models.minigpt import GPTConfig, MiniGPT
from optim.memory import state_report
from trainer.config import to_typed
from trainer.errors import ConfigError
from trainer.telemetry.probe import layer_of

FIXTURE = Path(__file__).parent / "fixtures" / "minigpt_e76a8ff.py"
spec = importlib.util.spec_from_file_location("minigpt_e76a8ff", FIXTURE)
old = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = old  # dataclasses look their module up there
spec.loader.exec_module(old)

LLAMA = {"norm": "rmsnorm", "mlp": "swiglu", "pos_emb": "rope", "bias": False, "tie_embeddings": False}
ARCHS = {
    "gpt2": {},
    "rmsnorm": {"norm": "rmsnorm"},
    "swiglu": {"mlp": "swiglu", "mlp_multiple_of": 16},
    "relu2": {"mlp": "relu2"},
    "qk_norm": {"qk_norm": True},
    "no_bias": {"bias": False},
    "untied": {"tie_embeddings": False},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"logit_softcap": 5.0},
    "llama": LLAMA,
    "qwen3": {**LLAMA, "qk_norm": True},
    "modded": {"norm": "rmsnorm", "mlp": "relu2", "pos_emb": "rope", "qk_norm": True, "logit_softcap": 15.0},
}
SHAPE = {"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}


def tiny(module=current, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return module.MiniGPT(module.GPTConfig(**SHAPE, **kw))


def train(model, steps: int, seed: int = 1) -> list[float]:
    """fp32 AdamW steps on fixed random batches; the loss of each step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 64, (4, 16), generator=gen)
        _, loss = model(x, torch.roll(x, -1, dims=1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kw", [{}, {"pos_emb": "rope"}, {"bias": False}, {"dropout": 0.1}], ids=str)
def test_defaults_equal_the_previous_model_bit_for_bit(kw):
    """Same initial weights (same names, order, values), then the same loss at every step and the same
    weights after 8 AdamW steps in fp32, against the model as committed before the options existed."""
    new, ref = tiny(**kw), tiny(old, **kw)
    assert [n for n, _ in new.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (name, a), b in zip(new.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    torch.manual_seed(5)  # the same dropout masks for both
    ours = train(new, 8)
    torch.manual_seed(5)
    theirs = train(ref, 8)
    assert ours == theirs
    for a, b in zip(new.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_causality_and_the_loss_falls(arch):
    model = tiny(**ARCHS[arch])
    idx = torch.randint(0, 64, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, 64) and loss.shape == () and math.isfinite(loss.item())
    model.eval()
    base, _ = model(idx)
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 7) % 64
    out, _ = model(changed)
    assert torch.equal(out[:, :9], base[:, :9]) and not torch.allclose(out[:, 9:], base[:, 9:])
    model.train()
    # a learnable task: every batch is the same 4 sequences
    torch.manual_seed(1)
    x = torch.randint(0, 64, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        _, loss = model(x, torch.roll(x, -1, dims=1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_each_option_builds_what_it_names():
    names = lambda **kw: {n for n, _ in tiny(**kw).named_parameters()}  # noqa: E731
    assert "h.0.mlp.c_gate.weight" in names(mlp="swiglu") and "h.0.mlp.c_gate.weight" not in names()
    assert {"h.0.attn.q_norm.weight", "h.0.attn.k_norm.weight"} <= names(qk_norm=True)
    assert not any(n.endswith(".bias") for n in names(norm="rmsnorm", bias=False))
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_params() == tiny().num_params() + 64 * 32
    rms = tiny(norm="rmsnorm").h[0].ln_1
    x = torch.randn(3, 32)
    torch.testing.assert_close(rms(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt())


def test_swiglu_width_is_rounded_as_llama_does():
    # Llama 2 7B: 4096 wide -> 11008; the GPT-2-small budget: 768 -> 2048 (same parameters as 4 x 768 GELU)
    assert GPTConfig(n_embd=4096, mlp="swiglu").mlp_width() == 11008
    assert GPTConfig(n_embd=768, mlp="swiglu").mlp_width() == 2048
    assert GPTConfig(n_embd=128, mlp="swiglu", mlp_multiple_of=64).mlp_width() == 384
    assert GPTConfig(n_embd=128, mlp="swiglu", mlp_hidden=100).mlp_width() == 100
    assert GPTConfig(n_embd=128).mlp_width() == GPTConfig(n_embd=128, mlp="relu2").mlp_width() == 512


def test_z_loss_and_softcap_do_what_they_say():
    x = torch.randint(0, 64, (2, 16))
    plain, zl = tiny().eval(), tiny(z_loss=1e-2).eval()
    logits, ce = plain(x, x)
    lse = torch.logsumexp(logits.view(-1, 64), dim=-1)
    torch.testing.assert_close(zl(x, x)[1], ce + 1e-2 * (lse**2).mean())
    with torch.no_grad():
        plain.lm_head.weight.mul_(200)  # logits far beyond the cap
    capped = tiny(logit_softcap=2.0).eval()
    capped.load_state_dict(plain.state_dict())
    raw, out = plain(x)[0], capped(x)[0]
    assert raw.abs().max() > 10 and out.abs().max() <= 2.0
    torch.testing.assert_close(out, 2.0 * torch.tanh(raw / 2.0))


@pytest.mark.parametrize("arch", ["gpt2", "swiglu", "relu2", "untied", "llama", "qwen3"])
def test_flops_per_token_matches_torch_flop_counter(arch):
    """6N + attention from the formula vs the matmul FLOPs torch counts in a forward and backward pass
    (which leaves out norms, biases and element-wise ops: a fraction of a percent here)."""
    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=128, **ARCHS[arch]))
    x = torch.randint(0, 512, (2, 64))
    # the math kernel is plain matmuls, which the counter sees (it counts the full T x T, as the formula does)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, x)[1].backward()
    measured = counter.get_total_flops() / x.numel()
    assert model.flops_per_token(64) == pytest.approx(measured, rel=0.01)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "modded"])
def test_statistics_name_every_layer(arch):
    model = tiny(**ARCHS[arch])
    layers = {n: layer_of(n) for n, _ in model.named_parameters()}
    assert ("other", "other") not in layers.values(), layers
    assert layers["h.1.mlp.c_proj.weight"] == ("block_01.mlp", "mlp")
    if ARCHS[arch].get("qk_norm"):
        assert layers["h.0.attn.q_norm.weight"] == ("block_00.norm", "norm")
    if not ARCHS[arch].get("tie_embeddings", True):
        assert layers["lm_head.weight"] == ("head", "head")


@pytest.mark.parametrize("name", ["adamw", "muon", "adafactor", "soap"])
def test_memory_report_covers_the_llama_layers(name):
    cfg = to_typed(compose_cfg([f"optimizer={name}", "model=llama-nano"]))
    torch.manual_seed(0)
    r = state_report(MiniGPT(cfg.model.architecture(256)), cfg.optimizer)
    assert r["measured_bytes"] == pytest.approx(r["theory_bytes"], rel=0.02)


BAD = {
    "norm": ("batchnorm", "norm='batchnorm' is not one of layernorm, rmsnorm"),
    "mlp": ("geglu", "mlp='geglu' is not one of gelu, swiglu, relu2"),
    "mlp_hidden": (0, "mlp_hidden=0 must be at least 1"),
    "mlp_multiple_of": (0, "mlp_multiple_of=0 must be at least 1"),
    "norm_eps": (0.0, "norm_eps=0.0 must be a positive number"),
    "rope_theta": (-1.0, "rope_theta=-1.0 must be a positive number"),
    "z_loss": (-1e-4, "z_loss=-0.0001 must be >= 0"),
    "logit_softcap": (float("inf"), "logit_softcap=inf must be >= 0"),
}


@pytest.mark.parametrize("field", BAD)
def test_bad_values_are_refused_in_one_line(field):
    value, message = BAD[field]
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        GPTConfig(vocab_size=64, **{field: value}).validate()
    with pytest.raises(ConfigError, match=f"model.{field}"):  # what the command line reports
        to_typed(compose_cfg([f"model.{field}={value}"]))


@pytest.mark.parametrize("field", ["qk_norm", "tie_embeddings", "bias"])
def test_boolean_options_refuse_other_values_while_composing(field):
    with pytest.raises(ConfigCompositionException, match=f"model.{field}=maybe"):
        compose_cfg([f"model.{field}=maybe"])


def test_presets_are_llama_style():
    for preset, layers in (("llama-nano", 4), ("llama-124m", 12)):
        m = to_typed(compose_cfg([f"model={preset}"])).model
        assert (m.norm, m.mlp, m.pos_emb, m.bias, m.n_layer) == ("rmsnorm", "swiglu", "rope", False, layers)
    with torch.device("meta"):
        big = MiniGPT(to_typed(compose_cfg(["model=llama-124m"])).model.architecture(50257))
    assert 120e6 < big.num_params() < 130e6  # the GPT-2-small budget


def test_muon_leaves_an_untied_head_to_adamw():
    from optim.torch_optimizers import muon_params

    for tie in (True, False):
        model = tiny(**{**LLAMA, "tie_embeddings": tie})
        hidden = {id(p) for p in muon_params(model)}
        assert id(model.lm_head.weight) not in hidden and id(model.wte.weight) not in hidden
        assert id(model.h[0].mlp.c_gate.weight) in hidden and id(model.h[0].attn.c_attn.weight) in hidden
