"""Several optimizers stepping disjoint parameter sets, presented as one torch Optimizer.

Muon updates only hidden 2-D matrices; its authors pair it with AdamW for embeddings, the head,
norms and biases. The trainer, the LR scheduler and checkpoints see one optimizer: `param_groups` is
the concatenation of the inner optimizers' own group dicts (so a scheduler's lr changes reach them),
and the state dict holds each inner optimizer's state dict.
"""

from __future__ import annotations

import torch


class CombinedOptimizer(torch.optim.Optimizer):
    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)
        params = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]
        super().__init__(params, {})
        # Share the inner group dicts rather than copies, so lr changes reach the inner optimizers.
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        for optimizer, state in zip(self.optimizers, state_dict["optimizers"], strict=True):
            optimizer.load_state_dict(state)
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]
