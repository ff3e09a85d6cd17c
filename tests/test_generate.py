"""Generation with a key/value cache: the same tokens as recomputing the whole context every step."""

from __future__ import annotations

import pytest
import torch

from models.minigpt import GPTConfig, KVCache, MiniGPT

ARCHS = {
    "gpt2": {},
    "rope": {"pos_emb": "rope"},
    "llama": {"norm": "rmsnorm", "mlp": "swiglu", "pos_emb": "rope", "bias": False, "mlp_multiple_of": 16},
    "qk_norm_softcap": {"norm": "rmsnorm", "mlp": "relu2", "pos_emb": "rope", "qk_norm": True, "logit_softcap": 5.0},
}
WINDOW = 16


def tiny(**kw) -> MiniGPT:
    torch.manual_seed(0)
    return MiniGPT(GPTConfig(vocab_size=64, block_size=WINDOW, n_layer=2, n_head=2, n_embd=32, **kw)).eval()


def greedy_reference(model: MiniGPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding that recomputes the whole context at every step, the context being what the cache
    holds: everything while it fits, then, each time it would pass the window, the newest half."""
    start = max(0, idx.size(1) - WINDOW)
    for _ in range(n):
        if idx.size(1) - start > WINDOW:
            start = idx.size(1) - WINDOW // 2
        logits, _ = model(idx[:, start:])
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_greedy_equals_uncached_greedy(arch):
    model = tiny(**ARCHS[arch])
    prompt = torch.randint(0, 64, (2, 3))
    cached = model.generate(prompt, WINDOW - 3, temperature=0)  # fills the window exactly
    assert torch.equal(cached, model.generate(prompt, WINDOW - 3, temperature=0, use_cache=False))
    assert cached.shape == (2, WINDOW)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_past_the_window_the_cache_keeps_the_newest_half(arch):
    model = tiny(**ARCHS[arch])
    prompt = torch.randint(0, 64, (2, 20))  # longer than the window: its last WINDOW tokens are read
    assert torch.equal(model.generate(prompt, 40, temperature=0), greedy_reference(model, prompt, 40))


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_logits_are_the_last_row_of_a_full_forward(arch):
    model = tiny(**ARCHS[arch])
    idx = torch.randint(0, 64, (2, 12))
    cache = KVCache(model.config.n_layer, WINDOW)
    with torch.no_grad():
        steps = [model(idx[:, :5], cache=cache)[0]] + [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 12)]
        full, _ = model(idx)
    assert all(s.shape == (2, 1, 64) for s in steps)  # the head runs over the last position only
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 4:], rtol=1e-5, atol=1e-5)


def test_a_filled_cache_takes_one_token_at_a_time():
    model = tiny()
    cache = KVCache(model.config.n_layer, WINDOW)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="one token at a time"):
            model(torch.zeros(1, 2, dtype=torch.long), cache=cache)


def test_sampling_with_a_seed_is_reproducible_and_in_range():
    model = tiny(pos_emb="rope")
    prompt = torch.zeros(1, 1, dtype=torch.long)
    runs = [model.generate(prompt, 30, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
            for _ in range(2)]  # fmt: skip
    assert torch.equal(*runs) and runs[0].shape == (1, 31) and int(runs[0].max()) < 64
