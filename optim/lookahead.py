"""Lookahead: k steps forward, 1 step back, around any inner optimizer.

Algorithm (Zhang, Lucas, Hinton, Ba 2019, "Lookahead Optimizer: k steps forward, 1 step back",
arXiv:1907.08610): keep slow weights phi, initialised to the initial parameters. The inner optimizer
updates the fast weights theta (the model's parameters) every step; after every k inner steps

    phi   <- phi + alpha * (theta - phi)
    theta <- phi

Reference code: `pytorch_optimizer.Lookahead` (github.com/kozistr/pytorch_optimizer,
pytorch_optimizer/optimizer/lookahead.py), which this matches with its defaults
(`pullback_momentum='none'`: the inner optimizer's state is left alone at synchronisation):
slow weights are clones of the parameters taken at construction, the counter is incremented after
each inner step and at the k-th the fast weights are lerped toward the slow ones with weight 1 - alpha
and copied into them (`_foreach_lerp_` + `_foreach_copy_`, the same ops, so results are bit-identical),
and, like the reference, parameters whose .grad is None at that moment are not synchronised.
Differences: one counter for the whole optimizer instead of one per param group (all groups step
together, so they are equal), and one foreach pass over all groups per (device, dtype) bucket.

Wrapper contract for the trainer: `param_groups` and `defaults` *are* the inner optimizer's objects
(properties, so they stay shared even after the inner load_state_dict replaces its group list), so an
LR scheduler built on the Lookahead drives the inner optimizer. `train()`, `eval()` (schedule-free) and
`update_hessian()` (Sophia) exist exactly when the inner optimizer has them and pass through.
state_dict() = {"inner": inner.state_dict(), "lookahead": {"k", "alpha", "counter", "slow_params":
[tensors in parameter order]}}, all tensors and plain values (torch.load(weights_only=True) reads it).
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import replace

import torch
from torch.optim import Optimizer

from optim.stats import Reducer, StatsContext, local

_PASSTHROUGH = ("train", "eval", "update_hessian")

# Lookahead's steps run on FSDP's shards, but its checkpoint state is not torch's {"state", "param_groups"}
# layout, the only one torch.distributed.checkpoint saves and loads.
FSDP_REFUSED = (
    "Lookahead's checkpoint state (slow weights beside the inner optimizer's state) is not in the layout "
    "that FSDP checkpoints (torch.distributed.checkpoint) save"
)


class Lookahead(Optimizer):
    """Lookahead(optimizer, k=5, alpha=0.5) around an already-built inner optimizer."""

    def __init__(self, optimizer: Optimizer, k: int = 5, alpha: float = 0.5):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"Lookahead wraps a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Lookahead k={k!r} must be an integer >= 1.")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Lookahead alpha={alpha} must be in [0, 1].")
        self.inner = optimizer
        self.k = k
        self.alpha = float(alpha)
        self._counter = 0
        # Optimizer.__init__ without its copy of the param groups: they are the inner optimizer's.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self.state = defaultdict(dict)  # per parameter: {"slow_param": tensor}
        self._init_slow(self._params())

    # -- shared views of the inner optimizer ---------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def defaults(self) -> dict:
        return self.inner.defaults

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails: hasattr(lookahead, "update_hessian") is True exactly
        # when the inner optimizer has it.
        inner = self.__dict__.get("inner")
        if name in _PASSTHROUGH and inner is not None and hasattr(inner, name):
            return getattr(inner, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __getstate__(self) -> dict:
        return {"inner": self.inner, "k": self.k, "alpha": self.alpha, "_counter": self._counter, "state": self.state}

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, inner={self.inner!r})"

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def _init_slow(self, params: list[torch.Tensor]) -> None:
        for p in params:
            if "slow_param" not in self.state[p]:
                self.state[p]["slow_param"] = p.detach().clone()

    def add_param_group(self, param_group: dict) -> None:
        self.inner.add_param_group(param_group)
        self._init_slow(self.param_groups[-1]["params"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    # -- the algorithm -------------------------------------------------------------------------
    def step(self, closure=None):
        loss = self.inner.step() if closure is None else self.inner.step(closure)
        self._counter += 1
        if self._counter >= self.k:
            self._counter = 0
            self._synchronise()
        return loss

    @torch.no_grad()
    def _synchronise(self) -> None:
        fast = [p for p in self._params() if p.grad is not None]
        if not fast:
            return
        slow = [self.state[p]["slow_param"] for p in fast]
        for (_, _), ((fs, ss), _) in Optimizer._group_tensors_by_device_and_dtype([fast, slow]).items():
            # fast <- fast + (1 - alpha) * (slow - fast) = slow + alpha * (fast - slow); slow <- fast.
            torch._foreach_lerp_(fs, ss, 1.0 - self.alpha)
            torch._foreach_copy_(ss, fs)

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "inner": self.inner.state_dict(),
            "lookahead": {
                "k": self.k,
                "alpha": self.alpha,
                "counter": self._counter,
                "slow_params": [self.state[p]["slow_param"] for p in self._params()],
            },
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the inner optimizer, the slow weights (copied) and the counter. k and alpha stay as built."""
        saved = state_dict["lookahead"]
        params = self._params()
        slow = saved["slow_params"]
        if len(slow) != len(params):
            raise ValueError(
                f"Lookahead state has {len(slow)} slow weights but the optimizer has {len(params)} params."
            )
        for i, (p, s) in enumerate(zip(params, slow, strict=True)):
            if s.shape != p.shape:
                raise ValueError(f"Lookahead slow weight {i} has shape {tuple(s.shape)}, param has {tuple(p.shape)}.")
        self.inner.load_state_dict(state_dict["inner"])
        for p, s in zip(params, slow, strict=True):
            self.state[p]["slow_param"] = s.detach().to(device=p.device, dtype=p.dtype, copy=True)
        self._counter = int(saved["counter"])


def lookahead_stats(ctx: StatsContext, out: Reducer, inner: Callable | None = None) -> None:
    """The inner optimizer's family statistics `inner` (read on the inner optimizer), plus:

    fast_slow_distance  ||theta - phi|| over all parameters: how far the fast weights have moved from the
                        slow ones since the last synchronisation. 0 right after one (every k-th step), so a
                        stats_interval that is a multiple of k always reads 0: choose one that is not.
    fast_slow_rel       fast_slow_distance / ||phi||.
    steps_since_sync    inner steps since the last synchronisation (0 to k - 1), to read the distance by.
    Statistics of the inner family that read the parameter change (Lion's sign agreement and flip rate,
    Muon's orthogonalised update, SGD's descent_cos) include the pull-back on a synchronisation step.
    """
    if inner is not None:
        inner(replace(ctx, optimizer=ctx.optimizer.inner), out)
    params, slow = ctx.state("slow_param")
    out.norm("fast_slow_distance", (local(p).float() - local(s).float() for p, s in zip(params, slow, strict=True)))
    out.sum_of("_sq/slow", slow, lambda x: x * x)
    out.derive("fast_slow_rel", lambda v: v["fast_slow_distance"] / v["_sq/slow"] ** 0.5 if v["_sq/slow"] > 0 else 0.0)
    out.derive("steps_since_sync", lambda v, n=ctx.optimizer._counter: float(n))
