"""Device, precision and process plumbing: device choice, autocast, grad scaler, seeding, signals."""

from __future__ import annotations

import contextlib
import random
import signal

import numpy as np
import torch

from trainer.config import DeviceKind, Precision
from trainer.errors import ConfigError


def pick_device(kind: DeviceKind) -> torch.device:
    if kind == DeviceKind.auto:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == DeviceKind.cuda and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
    if kind == DeviceKind.mps and not torch.backends.mps.is_available():
        raise ConfigError("trainer.device=mps but MPS is not available; use trainer.device=auto or cpu")
    return torch.device(kind.value)


def check_precision(precision: Precision, device: torch.device) -> None:
    if precision == Precision.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("trainer.precision=bf16 is not supported by this GPU; use trainer.precision=fp16")


def device_sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that a host timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; parameters and optimizer state stay fp32."""
    if precision == Precision.fp32:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == Precision.bf16 else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling is needed for fp16 only; disabled, the scaler is a pass-through."""
    return torch.amp.GradScaler(device.type, enabled=precision == Precision.fp16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class StopSignal:
    """Catch SIGTERM/SIGINT (cluster preemption, Ctrl-C): the loop checkpoints, then exits.

    A second signal while the first is handled falls back to the default behaviour.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
