"""What the hand-written optimizers share: hyperparameter checks (optim/checks.py) and gathering the parameters a step
updates. Each optimizer's maths stays in its own file."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from optim.checks import check_hparams


class CheckedOptimizer(Optimizer):
    """An Optimizer whose hyperparameters are checked for the defaults and for every added group."""

    def __init__(self, params, defaults: dict[str, Any]):
        check_hparams(**defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        check_hparams(**{k: v for k, v in param_group.items() if k != "params"})
        super().add_param_group(param_group)

    @staticmethod
    def closure_loss(closure) -> Any:
        """torch.optim's closure protocol: re-evaluate the loss (with grad) when a closure is given."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def params_with_grad(self, group: dict[str, Any]) -> list[torch.Tensor]:
        """The group's parameters that have a (dense) gradient this step."""
        params = [p for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients.")
        return params
