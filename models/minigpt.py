"""MiniGPT: a decoder-only transformer, GPT-2 by default, Llama-style by config; readable top to bottom.

Token embeddings plus learned positions (or rotary position embeddings), pre-norm blocks of causal
self-attention and an MLP, a final norm and an LM head. The defaults are GPT-2: LayerNorm with biases,
a GELU MLP four times as wide as the model, the head tied to the embedding. The options swap in what
Llama and recent speed runs use: RMSNorm, a SwiGLU or squared-ReLU MLP, no biases, QK-norm, an untied
head, a z-loss and logit soft-capping. Initialisation follows GPT-2: N(0, 0.02) everywhere, with the
residual projections scaled by 1/sqrt(2 * n_layer); norms start at 1.

This file knows nothing of data, optimizers or distribution: it maps token ids to logits (and a
loss when targets are given), reports its size and FLOPs, and samples with a key/value cache.
models/hf.py maps it to and from Hugging Face transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "relu2")


@dataclass
class GPTConfig:
    """The architecture: the one declaration of these fields and their checks (the trainer's `model`
    config group, trainer/config.py:ModelConfig, extends it)."""

    vocab_size: int | None = None  # the trainer fills it from the tokenizer (padded) before building
    block_size: int = 128  # longest sequence the model accepts
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2
    pos_emb: str = "learned"  # "learned" (GPT-2) or "rope"
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama)
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # "gelu" (GPT-2, tanh approximation), "swiglu" (Llama) or "relu2" (squared ReLU)
    mlp_hidden: int | None = None  # None: 4 * n_embd; swiglu: 2/3 of that rounded up to mlp_multiple_of
    mlp_multiple_of: int = 256  # Llama's rounding of the SwiGLU width
    qk_norm: bool = False  # normalise each head's queries and keys (the model's norm kind) before RoPE
    tie_embeddings: bool = True  # the LM head is the token embedding (GPT-2); false: its own matrix
    z_loss: float = 0.0  # adds z_loss * mean(logsumexp(logits)^2) to the loss (PaLM uses 1e-4); 0 = off
    logit_softcap: float = 0.0  # logits -> c * tanh(logits / c) (Gemma 2, modded-nanogpt); 0 = off

    def mlp_width(self) -> int:
        """The MLP's hidden size. SwiGLU has three matrices instead of two, so Llama takes 2/3 of 4 * n_embd
        (same parameters and FLOPs) and rounds it up to a multiple of `mlp_multiple_of`."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            hidden = int(2 * 4 * self.n_embd / 3)
            return -(-hidden // self.mlp_multiple_of) * self.mlp_multiple_of
        return 4 * self.n_embd

    def validate(self) -> None:
        """ValueError naming the first bad value, in the config's own terms (model.<field>)."""
        for key in ("n_layer", "n_head", "n_embd", "block_size", "mlp_multiple_of"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key}={getattr(self, key)} must be at least 1")
        for key, allowed in (("pos_emb", ("learned", "rope")), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("model.pos_emb=rope needs an even head size (model.n_embd / model.n_head)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"model.vocab_size={self.vocab_size} must be positive, or null to take the tokenizer's")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ValueError(f"model.mlp_hidden={self.mlp_hidden} must be at least 1, or null for the default width")
        positive = {"rope_theta": self.rope_theta, "norm_eps": self.norm_eps}
        nonnegative = {"z_loss": self.z_loss, "logit_softcap": self.logit_softcap}
        for key, value in positive.items():
            if not value > 0 or math.isinf(value):
                raise ValueError(f"model.{key}={value} must be a positive number")
        for key, value in nonnegative.items():
            if not value >= 0 or math.isinf(value):
                raise ValueError(f"model.{key}={value} must be >= 0 (0 turns it off)")


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (seq_len, head_dim / 2) for rotary embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) = (x[..., i], x[..., i + D/2]) of the head dimension by position-dependent
    angles: the "rotate half" layout of GPT-NeoX and transformers' Llama. x: (B, H, T, D)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Llama), normalised in fp32 whatever the autocast dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x) * self.weight


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


class LayerKV:
    """One layer's keys and values of the tokens read so far (B, n_head, max_len, head_dim), so that a
    new token attends to them instead of recomputing the prefix."""

    def __init__(self, max_len: int):
        self.max_len, self.length = max_len, 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys and values; return all of them so far."""
        if self.k is None:  # allocated once, in the dtype attention runs in (bf16 under autocast or FSDP)
            B, H, _, D = k.shape
            self.k, self.v = k.new_empty(B, H, self.max_len, D), v.new_empty(B, H, self.max_len, D)
        end = self.length + k.size(2)
        self.k[:, :, self.length : end], self.v[:, :, self.length : end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Every layer's keys and values, for generation (MiniGPT.forward's `cache`)."""

    def __init__(self, n_layer: int, max_len: int):
        self.layers = [LayerKV(max_len) for _ in range(n_layer)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def clear(self) -> None:
        for layer in self.layers:
            layer.length = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scale_init = True  # see MiniGPT._init_weights
        self.resid_dropout = nn.Dropout(config.dropout)
        # QK-norm bounds the attention logits, which lets higher learning rates train stably.
        head_dim = config.n_embd // config.n_head
        self.q_norm = make_norm(config, head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, head_dim) if config.qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: LayerKV | None = None) -> torch.Tensor:  # fmt: skip
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        start = cache.length if cache is not None else 0  # position of the first of these T tokens
        if rope is not None:
            cos, sin = rope[0][start : start + T], rope[1][start : start + T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)
        # Dispatches to flash / memory-efficient kernels where the device has them. A cache is filled
        # with a prefix (causal), then one token at a time: a single new query attends to every key.
        causal = cache is None or T > 1
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_width()
        self.kind = config.mlp
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        # SwiGLU: silu(gate(x)) * c_fc(x); a matrix of its own, so optimizers see it as one (Muon, stats).
        self.c_gate = nn.Linear(config.n_embd, hidden, bias=config.bias) if config.mlp == "swiglu" else None
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.residual_scale_init = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.c_gate(x)) * self.c_fc(x)
        elif self.kind == "relu2":  # squared ReLU (So et al. 2021, Primer)
            h = F.relu(self.c_fc(x)).square()
        else:  # GPT-2 used the tanh approximation of GELU; keep it so that GPT-2 weights behave the same.
            h = F.gelu(self.c_fc(x), approximate="tanh")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: LayerKV | None = None) -> torch.Tensor:  # fmt: skip
        x = x + self.attn(self.ln_1(x), rope, cache)
        return x + self.mlp(self.ln_2(x))


class MiniGPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        if config.vocab_size is None:
            raise ValueError("GPTConfig.vocab_size is needed to build the model")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # GPT-2: the output projection is the token embedding
            self.lm_head.weight = self.wte.weight
        if config.pos_emb == "rope":
            cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head, config.rope_theta)
            # Derived from the config, so not saved in checkpoints.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_scale_init", False):
                # Each block adds two residual branches; scale so the residual stream's
                # variance does not grow with depth (GPT-2 paper, section 2.3).
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) token ids. Returns logits (B, T, vocab) and the mean cross-entropy if targets.

        With a cache (generation), idx continues the tokens the cache holds, and only the last position's
        logits are computed: (B, 1, vocab)."""
        T = idx.size(1)
        start = cache.length if cache is not None else 0
        if start and T > 1:
            raise ValueError("a filled cache takes one token at a time (clear it to read a new prefix)")
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} exceeds block_size {self.config.block_size}")
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        else:
            rope = (self.rope_cos, self.rope_sin)
        x = self.drop(x)
        for i, block in enumerate(self.h):
            x = block(x, rope, cache.layers[i] if cache is not None else None)
        if cache is not None:
            x = x[:, -1:]  # the next token's distribution is all that generation reads
        logits = self.lm_head(self.ln_f(x))
        if self.config.logit_softcap:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits.float() / cap)
        loss = None
        if targets is not None:
            # The loss is computed in fp32 whatever the autocast dtype of the logits.
            flat = logits.float().view(-1, logits.size(-1))
            loss = F.cross_entropy(flat, targets.reshape(-1))
            if self.config.z_loss:  # keeps log Z near 0, so the logits cannot drift upwards together
                loss = loss + self.config.z_loss * torch.logsumexp(flat, dim=-1).square().mean()
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once). non_embedding drops token and position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 * L * H * Q * T.

        N counts every weight used in a matmul, so the head counts (once, when tied to the embedding)
        and the lookups do not: learned positions, and the token embedding when it is untied.
        """
        cfg = self.config
        T = seq_len or cfg.block_size
        lookups = (self.wpe.weight.numel() if self.wpe is not None else 0) + (
            0 if cfg.tie_embeddings else self.wte.weight.numel()
        )
        return 6 * (self.num_params() - lookups) + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T). temperature 0 means greedy.

        With the cache, each step reads one new token. When the context would pass block_size, the
        cache keeps the newest block_size // 2 tokens (read again as one prefix) and goes on, so a
        token sees between block_size / 2 and block_size tokens. Without it (the old way, for
        comparison), every step reads the last block_size tokens again and runs the head over all of them.
        """
        window = self.config.block_size
        start = max(0, idx.size(1) - window)  # the context is idx[:, start:]
        cache = KVCache(self.config.n_layer, window) if use_cache else None
        for _ in range(max_new_tokens):
            if cache is None:
                logits, _ = self(idx[:, -window:])
            else:
                if idx.size(1) - start > window:  # full: keep the newest half, to be read again
                    start = idx.size(1) - max(1, window // 2)
                    cache.clear()
                # what the cache lacks: the whole context at first and after a shift, else the newest token
                logits, _ = self(idx[:, start + cache.length :], cache=cache)
            next_id = pick_next(logits[:, -1, :].float(), temperature, top_k, generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx


def pick_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """The next token id (B, 1) from the last position's logits: argmax at temperature 0, else sampled
    from the softmax at that temperature over the top_k most likely tokens."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
