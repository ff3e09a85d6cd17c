"""The train half of each log record: the window of steps since the last log step, held on the device so
that only log steps read it."""

from __future__ import annotations

import torch

from optim.builder import state_bytes_measured
from trainer.distributed import Dist, mean_over_ranks
from trainer.telemetry.perf import TrainClock, peak_tflops, perf_record
from trainer.telemetry.probe import StatsProbe


class TrainLog:
    """Sums the train loss of the applied steps and counts the clipped ones; `record` turns the window into
    metrics.jsonl's train keys and starts a new one. `window()` is the progress a checkpoint keeps."""

    def __init__(self, optimizer: torch.optim.Optimizer, flops_per_token: float, device: torch.device, dist: Dist,
                 grad_clip: float, precision: str, loss_window: tuple[float, int] = (0.0, 0)):  # fmt: skip
        self.optimizer, self.flops_per_token, self.device, self.dist = optimizer, flops_per_token, device, dist
        self.grad_clip, self.peak = grad_clip, peak_tflops(device, precision)  # MFU: bf16/fp16 runs only
        self.loss_sum = torch.tensor(float(loss_window[0]), device=device)
        self.loss_count = loss_window[1]
        self.clipped = torch.zeros((), device=device)  # steps clipped since the last log step

    def add(self, loss: torch.Tensor, norm: torch.Tensor, applied: bool) -> None:
        """One step's loss and pre-clip norm; a skipped step's loss is left out of the mean."""
        if applied:
            self.loss_sum, self.loss_count = self.loss_sum + loss, self.loss_count + 1
        if self.grad_clip > 0:
            self.clipped += norm > self.grad_clip

    def window(self) -> tuple[float, int]:
        return self.loss_sum.item(), self.loss_count

    def record(self, lr: float, norm: torch.Tensor, clock: TrainClock, tokens_per_step: int,
               extra: dict, probe: StatsProbe | None) -> dict:  # fmt: skip
        """The log step's train record (host syncs here): mean loss over ranks and the window, lr, the last
        step's grad norm, throughput, clipping, `extra` (the anomaly guard's counters) and the probe's
        optimizer statistics when it has them."""
        train_loss = mean_over_ranks(self.loss_sum, self.dist).item() / max(self.loss_count, 1)
        tok_s = clock.steps * tokens_per_step / clock.lap()
        record = {"train/loss": train_loss, "lr": lr, "grad_norm": norm.item(), "tokens_per_s": tok_s,
                  "time/train_s": clock.seconds(),
                  "memory/optimizer_state_mb": state_bytes_measured(self.optimizer) / 2**20}  # fmt: skip
        if self.grad_clip > 0:
            record.update({"grad/clip_coef": min(1.0, self.grad_clip / (record["grad_norm"] + 1e-6)),
                           "grad/clipped_steps": int(self.clipped.item())})  # fmt: skip
            self.clipped.zero_()
        record.update(perf_record(tok_s / self.dist.world_size, self.flops_per_token, self.device, self.peak))
        record.update(extra)
        if probe is not None and probe.ready:
            stats = probe.result()
            record.update(stats)
            record["update/ratio_log10/by_layer"] = probe.ratios_by_layer(stats)  # a W&B histogram
        self.loss_sum.zero_()
        self.loss_count = 0
        return record
