"""Hyperparameter checks, in two places a bad value can arrive:

- `require` and its shorthands: an optimizer config's `validate()` (run before training, on the typed
  config) raises ValueError("optimizer.<field>=<value> must be <what>"), which the trainer prints as
  its one-line error;
- `check_hparams`: the constructors of the hand-written optimizers (called directly, from Python)
  raise ValueError("Invalid <name> <value>: ..."), as torch.optim does.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch


def require(cfg: Any, name: str, ok: Callable[[Any], bool], what: str) -> None:
    """ValueError naming `optimizer.<name>` unless `ok(value)`; a None value (a "use the default") passes."""
    value = getattr(cfg, name)
    if value is not None and not ok(value):
        shown = list(value) if isinstance(value, (list, tuple)) else value
        raise ValueError(f"optimizer.{name}={shown} must be {what}")


def positive(cfg: Any, *names: str) -> None:
    for name in names:
        require(cfg, name, lambda v: v > 0, "> 0")


def non_negative(cfg: Any, *names: str) -> None:
    for name in names:
        require(cfg, name, lambda v: v >= 0, ">= 0")


def below_one(cfg: Any, *names: str) -> None:
    """In [0, 1): a decay factor that still moves (momentum, an EMA's beta)."""
    for name in names:
        require(cfg, name, lambda v: 0 <= v < 1, "in [0, 1)")


def betas(cfg: Any, name: str = "betas") -> None:
    require(cfg, name, lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1), e.g. [0.9,0.95]")


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and not math.isnan(x)


def check_hparams(**h: Any) -> None:
    """ValueError, in one sentence, for the first bad lr, eps, weight_decay or betas among those given."""
    lr = h.get("lr", 0.0)
    if not ((_is_number(lr) or (torch.is_tensor(lr) and lr.numel() == 1)) and float(lr) >= 0.0):
        raise ValueError(f"Invalid lr {lr!r}: it must be a number >= 0.")
    for name in ("eps", "weight_decay"):
        if name in h and not (_is_number(h[name]) and h[name] >= 0.0):
            raise ValueError(f"Invalid {name} {h[name]!r}: it must be a number >= 0.")
    if "betas" in h:
        pair = h["betas"]
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"Invalid betas {pair!r}: expected two numbers in [0, 1).")
        for i, beta in enumerate(pair):
            if not (_is_number(beta) and 0.0 <= beta < 1.0):
                raise ValueError(f"Invalid betas[{i}] {beta!r}: it must be in [0, 1).")
