"""Throughput figures for the log: achieved model FLOP/s, MFU on known GPUs, and peak memory.

MFU = achieved model FLOP/s (MiniGPT.flops_per_token x tokens/s, PaLM's definition: no recomputation
counted) over the device's dense bf16 tensor-core peak. Peaks are the vendors' datasheet figures for
dense (not sparse) bf16; an unknown device logs achieved TFLOP/s only.
"""

from __future__ import annotations

import resource
import sys
import time

import torch

PEAK_BF16_TFLOPS = {  # substring of torch.cuda.get_device_name() -> dense bf16 TFLOP/s
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "A100": 312.0,
    "A10G": 125.0,  # AWS's A10G (datasheet bf16 with sparsity 250)
    "A10": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,  # fp16 tensor cores (V100 has no bf16)
}


def peak_tflops(device: torch.device, precision: str = "bf16") -> float | None:
    """The dense bf16/fp16 tensor-core peak; None on a CPU, an unknown GPU, or for an fp32 run (whose peak
    depends on TF32 settings: no MFU is logged rather than one against the wrong peak)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


def mem_peak_gib(device: torch.device) -> float:
    """Peak memory so far: CUDA's allocated peak on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def perf_record(tokens_per_s: float, flops_per_token: float, device: torch.device, peak: float | None) -> dict:
    """The perf/ keys of a log step, from one device's tokens/s (the global figure / world size)."""
    tflops = tokens_per_s * flops_per_token / 1e12
    record = {"perf/tflops": tflops, "perf/mem_peak": mem_peak_gib(device)}
    if peak:
        record["perf/mfu"] = tflops / peak
    return record


class TrainClock:
    """Wall time spent in training steps, paused around evals and checkpoints: tokens/s over the current
    lap, and the run's total (`time/train_s`, kept in checkpoints so that it continues across resumes)."""

    def __init__(self, total: float = 0.0):
        self.total, self.steps, self._start, self._running = total, 0, time.perf_counter(), True

    def lap(self) -> float:
        """Seconds since the last restart (while running)."""
        return time.perf_counter() - self._start if self._running else 0.0

    def seconds(self) -> float:
        return self.total + self.lap()

    def pause(self) -> None:
        self.total, self._running = self.seconds(), False

    def restart(self) -> None:
        self.pause()
        self.steps, self._start, self._running = 0, time.perf_counter(), True
