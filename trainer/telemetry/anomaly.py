"""Anomaly detection: non-finite steps, gradient explosions and loss spikes, each with an action.

  non-finite    the loss or the global gradient norm is inf or NaN
  grad explosion the pre-clip gradient norm exceeds `grad_explosion_factor` x its running median
                over the last `window` applied steps
  loss spike    the step's loss is more than `loss_spike_zscore` standard deviations above its running
                mean (an exponential average with span `window`)

Actions (trainer.anomaly.*): `warn` logs it; `skip` leaves the weights and optimizer state untouched
(the batch is consumed, the step number and the lr schedule advance) and counts it; `stop` writes a
checkpoint of the weights before the step and exits with a message. After `max_consecutive_skips`
skips in a row the run stops. Defaults: skip non-finite steps, warn on the rest.

Detection runs on the device every step. Warnings are read at log steps, so `warn` costs no host
sync; `skip` and `stop` must decide before the optimizer step, so while any detector has one of them,
each step reads one small flag vector on the host (all-reduced over ranks, so every rank decides
alike). Under fp16 the GradScaler already skips overflowed steps and lowers its scale: non-finite
gradients there are its business and only counted (`anomaly/scaler_skips`).
"""

from __future__ import annotations

import logging

import torch

from trainer.config import AnomalyAction, AnomalyConfig

log = logging.getLogger(__name__)
KINDS = ("nonfinite", "grad_explosion", "loss_spike")
WARN, SKIP, STOP = AnomalyAction.warn, AnomalyAction.skip, AnomalyAction.stop


class AnomalyGuard:
    def __init__(self, cfg: AnomalyConfig, device: torch.device, fp16: bool = False, reduce_max=None):
        self.cfg = cfg
        self.actions = {"nonfinite": WARN if fp16 else cfg.nonfinite, "grad_explosion": cfg.grad_explosion,
                        "loss_spike": cfg.loss_spike}  # fmt: skip
        self.fp16 = fp16
        self.per_step = any(a != WARN for a in self.actions.values())
        self.reduce_max = reduce_max  # all-reduce MAX over ranks (None on one process)
        self.norms = torch.full((cfg.window,), float("nan"), device=device)  # recent applied grad norms
        self.loss_mean = torch.zeros((), device=device)
        self.loss_var = torch.zeros((), device=device)
        self.seen = torch.zeros((), device=device)  # applied steps so far (on the device: no sync)
        self.events = torch.zeros(len(KINDS), device=device)  # since the last log step
        self.skipped = 0  # skipped steps since the last log step (known on the host: skips sync)
        self.skipped_total = 0
        self.consecutive = 0
        self.stop_reason: str | None = None
        self.applied = True  # the last step's decision (always True while no action syncs)

    def allow(self, step: int, loss: torch.Tensor, norm: torch.Tensor) -> bool:
        """Detect on the device; return whether the optimizer step should be applied (a host sync
        only when some action is skip or stop), and keep the answer in `self.applied`."""
        self.applied = self._decide(step, loss, norm)
        return self.applied

    @torch.no_grad()
    def _decide(self, step: int, loss: torch.Tensor, norm: torch.Tensor) -> bool:
        loss, norm = loss.detach().float(), norm.detach().float()
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        median = torch.nanmedian(self.norms)
        warm = self.seen >= self.cfg.window // 4  # enough history for a baseline
        explosion = finite & warm & (norm > self.cfg.grad_explosion_factor * median)
        std = self.loss_var.clamp_min(1e-12).sqrt()
        spike = finite & warm & (loss - self.loss_mean > self.cfg.loss_spike_zscore * std)
        flags = torch.stack([~finite, explosion, spike]).float()
        self.events += flags
        if self.per_step:
            host = self.reduce_max(flags) if self.reduce_max else flags
            flagged = [k for k, f in zip(KINDS, host.tolist(), strict=True) if f]
            if any(self.actions[k] == STOP for k in flagged):
                self.stop_reason = f"{', '.join(flagged)} at step {step} (trainer.anomaly: stop)"
                return False
            if any(self.actions[k] == SKIP for k in flagged):
                return self._skip(step, flagged)
            self.consecutive = 0
        self._observe(loss, norm, finite & ~explosion & ~spike)
        return True

    def _skip(self, step: int, flagged: list[str]) -> bool:
        self.skipped, self.skipped_total, self.consecutive = (
            self.skipped + 1,
            self.skipped_total + 1,
            self.consecutive + 1,
        )
        log.warning("step %d skipped: %s", step, ", ".join(flagged))
        if self.consecutive >= self.cfg.max_consecutive_skips:
            self.stop_reason = (
                f"{self.consecutive} steps skipped in a row (trainer.anomaly.max_consecutive_skips="
                f"{self.cfg.max_consecutive_skips}), the last for {', '.join(flagged)} at step {step}"
            )
        return False

    def _observe(self, loss: torch.Tensor, norm: torch.Tensor, normal: torch.Tensor) -> None:
        """Add a normal step to the baselines (anomalies would inflate them), without a host branch."""
        w = normal.float()
        slot = (self.seen % self.cfg.window).long()
        self.norms[slot] = torch.where(normal, norm, self.norms[slot])
        alpha = 2.0 / (self.cfg.window + 1)
        alpha = torch.where(self.seen == 0, torch.ones_like(self.loss_mean), torch.full_like(self.loss_mean, alpha))
        delta = torch.where(normal, loss - self.loss_mean, torch.zeros_like(loss))
        self.loss_mean += w * alpha * delta
        self.loss_var = torch.where(normal, (1 - alpha) * (self.loss_var + alpha * delta * delta), self.loss_var)
        self.seen += w

    def log_record(self) -> dict:
        """Counts since the last log step (read on the host: call at log steps only); warns on them."""
        counts = dict(zip(KINDS, self.events.tolist(), strict=True))
        for kind, n in counts.items():
            if n and self.actions[kind] == WARN and not (kind == "nonfinite" and self.fp16):
                log.warning("%s at %d step(s) since the last log step", kind.replace("_", " "), int(n))
        record = {f"anomaly/{k}": int(n) for k, n in counts.items()}
        if self.fp16:
            record["anomaly/scaler_skips"] = record.pop("anomaly/nonfinite")
        record |= {"anomaly/skipped_steps": self.skipped, "anomaly/skipped_total": self.skipped_total}
        self.events.zero_()
        self.skipped = 0
        return record

    def state_dict(self) -> dict:
        tensors = {"norms": self.norms, "loss_mean": self.loss_mean, "loss_var": self.loss_var, "seen": self.seen}
        return {k: v.cpu() for k, v in tensors.items()} | {"skipped_total": self.skipped_total,
                                                           "consecutive": self.consecutive}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        device = self.norms.device
        self.norms = state["norms"].to(device)
        self.loss_mean, self.loss_var = state["loss_mean"].to(device), state["loss_var"].to(device)
        self.seen = state["seen"].to(device)
        self.skipped_total, self.consecutive = state["skipped_total"], state["consecutive"]
