"""Optimizer-state memory: measured after a real step, beside what the algorithm needs in theory."""

from __future__ import annotations

import torch
from torch import nn

from optim.builder import (
    BuildContext,
    HookContext,
    OptimizerConfig,
    build_hook,
    build_optimizer,
    hook_every,
    numel,
    state_bytes_measured,
    state_bytes_theory,
)


def state_report(model: nn.Module, cfg: OptimizerConfig, seq_len: int = 32, batch: int = 2) -> dict:
    """Build the optimizer for `model`, take one real step (and the optimizer's hook, e.g. Sophia's
    Hessian refresh, so that every state exists), then count the state's tensor bytes."""
    device = next(model.parameters()).device
    # One step: optimizer.fused=auto never compiles for it (the state is the same either way).
    ctx = BuildContext(device, global_batch=batch, tokens_per_step=batch * seq_len, max_steps=1)
    optimizer = build_optimizer(model, cfg, ctx)
    vocab = model.config.vocab_size

    def next_batch():
        x = torch.randint(0, vocab, (batch, seq_len), device=device)
        return x, torch.roll(x, -1, dims=1)

    _, loss = model(*next_batch())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    upcoming = lambda n: [next_batch() for _ in range(n)]  # noqa: E731
    hook = build_hook(model, optimizer, cfg, HookContext(upcoming, torch.autocast(device.type, enabled=False)))
    if hook is not None:  # call it at a step where it fires (Sophia: every hessian_interval steps)
        hook(hook_every(cfg))
    n = numel(model)
    measured, theory = state_bytes_measured(optimizer), state_bytes_theory(model, cfg)
    return {"params": n, "measured_bytes": measured, "theory_bytes": theory,
            "measured_per_param": measured / n, "theory_per_param": theory / n}  # fmt: skip
