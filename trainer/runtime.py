"""Device, precision and process plumbing: device choice, precision (and its `auto` probe), autocast, grad
scaler, seeding, signals."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

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
        raise ConfigError("trainer.precision=bf16 is not supported by this GPU; use trainer.precision=fp16 or auto")


def device_sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that a host timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Numerics:
    """What a run computes in: the precision (never auto) and whether autocast keeps scaled dot-product
    attention to its math kernel. On CPU, bf16 flash attention's backward is several times slower than
    the math kernel at small sizes, and under torch.compile the math kernel fuses with its neighbours."""

    precision: Precision
    math_attention: bool = False
    why: str = ""  # said in the start-up line

    @property
    def name(self) -> str:
        return self.precision.value + ("+math-attention" if self.math_attention else "")


class Autocast:
    """Mixed precision for the forward pass (parameters and optimizer state stay fp32), and the attention
    kernel choice of `Numerics`. Re-entrant and reusable: the loop enters the same one every micro-step."""

    def __init__(self, precision: Precision, device: torch.device, math_attention: bool = False):
        if precision == Precision.auto:
            raise ValueError("resolve trainer.precision=auto first (resolve_precision)")
        self.precision, self.device, self.math_attention = precision, device, math_attention
        self._stacks: list[contextlib.ExitStack] = []

    def __enter__(self) -> Autocast:
        stack = contextlib.ExitStack()
        if self.precision != Precision.fp32:
            dtype = torch.bfloat16 if self.precision == Precision.bf16 else torch.float16
            stack.enter_context(torch.autocast(device_type=self.device.type, dtype=dtype))
        if self.math_attention:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        self._stacks.append(stack)
        return self

    def __exit__(self, *exc) -> None:
        self._stacks.pop().__exit__(*exc)


def autocast(precision: Precision | Numerics, device: torch.device) -> Autocast:
    """The forward pass's context for a precision or a resolved `Numerics`."""
    if isinstance(precision, Numerics):
        return Autocast(precision.precision, device, precision.math_attention)
    return Autocast(precision, device)


def grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling is needed for fp16 only; disabled, the scaler is a pass-through."""
    return torch.amp.GradScaler(device.type, enabled=precision == Precision.fp16)


# trainer.precision=auto. On a GPU the rule is the field's: bf16 where the GPU has it, else fp16 with loss
# scaling. On a CPU no flag check is enough: this project's 2-core Xeon has AMX and AVX512-BF16, yet eager bf16
# autocast ran 1.33x slower than fp32 at nano size (casts and bf16 flash attention's backward cost more
# than small matmuls gain), while bf16 with the math attention kernel ran faster. So the CPU measures:
# a few forward+backward passes of this model shape under each candidate, alternating, once per machine
# and shape, cached in a JSON file. bf16 must win by PROBE_MARGIN to be chosen over fp32.

PROBE_MARGIN = 0.95  # bf16 is chosen when it takes at most 95% of fp32's time (fp32 is the more exact)
PROBE_TOKENS = 4096  # the probe's batch holds at most this many tokens (whole sequences, at least one)
CANDIDATES = (
    Numerics(Precision.fp32),
    Numerics(Precision.bf16),
    Numerics(Precision.bf16, math_attention=True),
)


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def machine_name(device: torch.device) -> str:
    """The processor (CPU) or GPU model: part of the probe cache's key."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_seconds(model: torch.nn.Module, batch: tuple[int, int], device: torch.device,
                  candidates: tuple[Numerics, ...], rounds: int = 3) -> dict[str, float]:  # fmt: skip
    """Seconds of one forward+backward of `model` on random tokens of shape `batch` under each candidate:
    the best of `rounds` alternating rounds after one warm-up round (fewer when a pass takes seconds).
    On a CPU it counts one thread's CPU time, so that other processes on the machine do not decide the
    ranking (with two threads, a busy machine made the wall times random). The weights are unchanged,
    gradients are dropped, and the RNG state is restored."""
    gen = torch.Generator(device=device).manual_seed(0)
    x, y = (torch.randint(model.config.vocab_size, batch, generator=gen, device=device) for _ in range(2))
    best = {c.name: float("inf") for c in candidates}
    cpu, threads = device.type == "cpu", torch.get_num_threads()
    clock = time.thread_time if cpu else time.perf_counter
    if cpu:
        torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            r = 0
            while r <= rounds:
                for c in candidates:
                    start = clock()
                    with autocast(c, device):
                        _, loss = model(x, y)
                    loss.backward()
                    device_sync(device)
                    if r > 0:
                        best[c.name] = min(best[c.name], clock() - start)
                    elif clock() - start > 2.0:
                        rounds = 1  # a big model on a CPU: one timed round is enough to rank the candidates
                r += 1
    finally:
        torch.set_num_threads(threads)
        for p in model.parameters():
            p.grad = None
    return best


def probe_key(device: torch.device, model_config, batch: tuple[int, int]) -> str:
    """The probe cache's key: the machine, threads, torch version, the model's shape and the batch."""
    fields = {"machine": machine_name(device), "device": device.type, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "model": asdict(model_config), "batch": list(batch)}  # fmt: skip
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    """Atomically (concurrent runs may write the same file: the last one wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def probe_batch(micro_batch: int, seq_len: int) -> tuple[int, int]:
    return max(1, min(micro_batch, PROBE_TOKENS // seq_len)), seq_len


def measured_step(model: torch.nn.Module, device: torch.device, batch: tuple[int, int], cache: Path,
                  candidates: tuple[Numerics, ...]) -> tuple[dict[str, float], bool]:  # fmt: skip
    """Each candidate's forward+backward seconds for this machine and model shape: from `cache` (a JSON
    file) when it holds them, else probed now and stored. Returns (seconds by name, whether cached)."""
    key = probe_key(device, model.config, batch)
    entries = _read_json(cache)
    seconds = entries.get(key, {}).get("seconds", {})
    if all(c.name in seconds for c in candidates):
        return seconds, True
    seconds = {**seconds, **probe_seconds(model, batch, device, candidates)}
    entries = _read_json(cache)  # again: another run may have written meanwhile
    entries[key] = {"seconds": seconds, "machine": machine_name(device), "batch": list(batch),
                    "model": asdict(model.config), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "measured": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    _write_json(cache, entries)
    return seconds, False


Measure = Callable[[tuple[Numerics, ...]], tuple[dict[str, float], bool]]  # measured_step for one model


def resolve_precision(requested: Precision, device: torch.device, measure: Measure, where: str = "") -> Numerics:
    """The run's numerics for trainer.precision on this device: a forced precision as it is, auto by the rule
    above. `measure(candidates)` gives each candidate's forward+backward seconds and whether they were
    cached (`measured_step` for the run's model and batch); it is called only for auto on a bf16 CPU.
    `where` (the cache file) is named in the reason."""
    if requested != Precision.auto:
        check_precision(requested, device)
        return Numerics(requested, why=f"trainer.precision={requested.value}")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Numerics(Precision.bf16, why="auto: this GPU has bf16")
        return Numerics(Precision.fp16, why="auto: this GPU has no bf16, so fp16 with loss scaling")
    if device.type != "cpu":
        return Numerics(Precision.fp32, why=f"auto: autocast on {device.type} is not measured here, so fp32")
    if not cpu_has_bf16():
        return Numerics(Precision.fp32, why="auto: this CPU has no native bf16 (AVX512-BF16 or AMX), so fp32")
    seconds, cached = measure(CANDIDATES)
    fp32 = CANDIDATES[0]
    best = min(CANDIDATES[1:], key=lambda c: seconds[c.name])
    ratio = seconds[best.name] / seconds[fp32.name]
    winner = best if ratio <= PROBE_MARGIN else fp32
    why = (f"auto: {best.name} took {ratio:.2f}x fp32's forward+backward time on this CPU for this model "
           f"({'cached ' if cached else ''}probe{', ' + where if where else ''})")  # fmt: skip
    return Numerics(winner.precision, winner.math_attention, why)


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
