"""torch.compile for the trainer: where compiled code is cached on disk, and whether a run is long enough to
win its compile time back (`trainer.compile=auto`).

Compilation costs a fixed time at the first step (tracing, code generation, and on a CPU a C++ compiler) and
then saves a share of every step. Inductor caches what it generates, keyed by the graph, so a second run
of the same model shape loads it in seconds. `auto` compiles when the steps left, times the estimated step
time, times the share compiling saves is more than the compile time it expects: the warm figure when this
machine has compiled this model shape before (a small ledger beside the cache says so), the cold one
otherwise. The figures below were measured on this project's 2-core CPU (docs/performance.md has the
commands); the GPU figures are not measured here, they are the field's usual experience.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

# TORCHINDUCTOR_CACHE_DIR set by the user before the trainer started wins over the trainer's cache directory.
_USER_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")

COMPILE_SECONDS = {  # device type -> (a first compile, a compile from the cache), whole model
    "cpu": (60.0, 10.0),
    "cuda": (60.0, 15.0),
}
STEP_SAVED = {  # (device type, precision) -> share of a step's time that compiling saves
    ("cpu", "fp32"): 0.0,  # measured 0.96-1.04x of eager at nano and default sizes: nothing to win
    ("cpu", "bf16"): 0.2,  # measured 0.73-0.78x of eager (bf16 with the math attention kernel)
    ("cuda", "bf16"): 0.3,  # not measured here
    ("cuda", "fp16"): 0.3,
    ("cuda", "fp32"): 0.2,
}


CPU_THREADS_EXPONENT = 0.6  # n threads run a step n^0.6 times as fast as one (2 threads: 1.5x, nano, quiet)


def eager_step_seconds(probe_s: float, scale: float, device: torch.device) -> float:
    """An optimizer step's eager seconds from the precision probe's forward+backward (runtime.probe_seconds)
    of a batch `scale` times smaller than the step's; on a CPU the probe counted one thread."""
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    return probe_s * scale / threads**CPU_THREADS_EXPONENT


def use_compile_cache(directory: str | Path) -> Path:
    """Point inductor's on-disk caches (FX graphs, AOT autograd, generated kernels, Triton's) at `directory`
    for this whole process, and return it. A TORCHINDUCTOR_CACHE_DIR set before the process started wins.
    Call it before the first torch.compile: the trainer does in setup_run; a script that compiles (an
    optimizer step, say) calls it itself."""
    path = Path(_USER_CACHE or directory).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def uncompiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module torch.compile wrapped (the module itself when it is not compiled). Evaluation runs it: a
    handful of forward passes every few hundred steps would otherwise compile a second graph."""
    return getattr(module, "_orig_mod", module)


def compile_key(**facts) -> str:
    """The ledger's key for what is compiled: the machine, torch, the model shape, batch, numerics, wrapping."""
    facts["torch"] = torch.__version__
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Ledger:
    """Which model shapes this machine has compiled, and how long their first steps took (a JSON file beside
    the inductor cache): a shape in it is expected to compile from the cache."""

    def __init__(self, path: Path):
        self.path = path

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> dict | None:
        return self._read().get(key)

    def record(self, key: str, first_step_s: float) -> None:
        """After a compiled run's first step: its time is the cold figure the first time, the warm one after."""
        entries = self._read()
        entry = entries.get(key)
        entries[key] = {"cold_s": first_step_s} if entry is None else {**entry, "warm_s": first_step_s}
        entries[key]["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def needs_step_estimate(mode, device_type: str, precision: str) -> bool:
    """Whether `decide` will need the eager step's seconds (which may cost a probe: take it before wrapping)."""
    return mode == "auto" and STEP_SAVED.get((device_type, precision), 0.0) > 0


def decide(mode, steps_left: int, step_s: float | None, device_type: str, precision: str,
           seen: dict | None) -> tuple[bool, str]:  # fmt: skip
    """(compile?, why) for trainer.compile=`mode`; for auto, from the steps left, the estimated eager step
    seconds (needed where `needs_step_estimate`), the share compiling saves on this device and precision, and
    the ledger's entry (`seen`) for this shape (None: never compiled here, so a cold compile)."""
    if mode is not True and mode is not False and mode != "auto":
        raise ValueError(f"trainer.compile={mode!r}")
    if mode != "auto":
        return bool(mode), f"trainer.compile={str(mode).lower()}"
    saved = STEP_SAVED.get((device_type, precision), 0.0)
    if saved <= 0:
        return False, f"auto: compiling does not speed {precision} up on {device_type} (measured)"
    if steps_left <= 0:
        return False, "auto: no steps left to train"
    cold, warm = COMPILE_SECONDS.get(device_type, COMPILE_SECONDS["cuda"])
    cost, which = (seen.get("warm_s", warm), "from the cache") if seen else (cold, "a first compile")
    gain = steps_left * step_s * saved
    verdict = gain > cost
    why = (f"auto: {steps_left} steps x ~{1000 * step_s:.0f} ms x {saved:.0%} saved = ~{gain:.0f} s "
           f"{'>' if verdict else '<='} ~{cost:.0f} s to compile ({which})")  # fmt: skip
    return verdict, why
