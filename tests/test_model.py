"""MiniGPT: shapes, causality, tying, initialisation, size and FLOPs."""

from __future__ import annotations

import math

import pytest
import torch

from models.minigpt import GPTConfig, MiniGPT


def tiny(**kw) -> MiniGPT:
    torch.manual_seed(0)
    return MiniGPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, **kw))


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_shapes_and_loss(pos_emb):
    model = tiny(pos_emb=pos_emb)
    idx, targets = torch.randint(0, 64, (2, 3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 64)
    assert loss.shape == () and math.isfinite(loss.item())
    # at initialisation the prediction is near uniform: loss close to ln(vocab)
    assert abs(loss.item() - math.log(64)) < 0.5
    assert model(idx)[1] is None


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_causality_future_tokens_never_change_earlier_logits(pos_emb):
    model = tiny(pos_emb=pos_emb).eval()
    idx = torch.randint(0, 64, (2, 16))
    base, _ = model(idx)
    for t in (0, 5, 14):
        changed = idx.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % 64
        out, _ = model(changed)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1])
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])


def test_weight_tying_and_init():
    model = MiniGPT(GPTConfig(vocab_size=256, n_layer=8, n_embd=128, n_head=4))
    assert model.lm_head.weight is model.wte.weight
    std = model.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(2 * 8)) < 0.001  # scaled residual projections
    assert abs(model.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.001
    assert torch.count_nonzero(model.h[0].mlp.c_fc.bias) == 0


def test_too_long_sequence_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_bias_off_has_no_bias_parameters():
    names = [n for n, _ in tiny(bias=False).named_parameters()]
    assert not any(n.endswith(".bias") for n in names)


def test_parameter_counts_match_gpt2_and_nano():
    # GPT-2 small has 124,439,808 parameters with its 50257-token vocabulary (tied head).
    with torch.device("meta"):
        gpt2 = MiniGPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    assert gpt2.num_params() == 124_439_808
    assert gpt2.num_params(non_embedding=True) == 124_439_808 - 50257 * 768 - 1024 * 768
    nano = MiniGPT(GPTConfig(vocab_size=256))
    assert 0.5e6 < nano.num_params() < 1.5e6


def test_flops_per_token_formula():
    cfg = GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128)
    model = MiniGPT(cfg)
    n_matmul = model.num_params() - 128 * 128  # learned positions are a lookup, not a matmul
    assert model.flops_per_token() == 6 * n_matmul + 12 * 4 * 4 * 32 * 128
    assert model.flops_per_token(64) < model.flops_per_token(128)


def test_generate_appends_tokens_and_greedy_is_deterministic():
    model = tiny().eval()
    start = torch.zeros(1, 3, dtype=torch.long)
    a = model.generate(start, 20, temperature=0)
    b = model.generate(start, 20, temperature=0)
    assert a.shape == (1, 23) and torch.equal(a, b)
    sampled = model.generate(start, 5, temperature=1.0, top_k=5)
    assert sampled.shape == (1, 8) and int(sampled.max()) < 64
