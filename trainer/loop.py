"""The training loop: steps, evaluation, logging and checkpoints. Everything is built in trainer/build.py.

Host syncs: the loss and the gradient norm stay on the device and are read at log, eval and checkpoint
steps. One more, every step, while any anomaly detector's action is skip or stop (the default skips
non-finite steps): the guard reads a 3-element flag vector before the optimizer step, because whether to
apply the step must be known on the host (trainer/telemetry/anomaly.py). `trainer.anomaly.nonfinite=warn`
removes it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from optim.builder import eval_mode, family_stats, state_bytes_measured
from trainer import checkpoint as ckpt_io
from trainer.build import Run, optimizer_format
from trainer.data.sampling import validation_windows
from trainer.distributed import any_rank, grad_sync, mean_over_ranks
from trainer.runtime import StopSignal, autocast, rng_state
from trainer.telemetry.metrics import MetricsLogger
from trainer.telemetry.perf import TrainClock, peak_tflops, perf_record
from trainer.telemetry.probe import StatsProbe

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    step: int
    val_loss: float | None
    interrupted_by: int | None  # the signal number when stopped early
    anomaly: str | None = None  # why trainer.anomaly stopped the run


def train_step(
    model: torch.nn.Module,
    micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    n_micro: int,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ctx,
    params: Sequence[torch.nn.Parameter],
    grad_clip: float = 0.0,
    grad_clip_value: float = 0.0,
    allow: Callable[[torch.Tensor, torch.Tensor], bool] | None = None,
    probe: StatsProbe | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over n_micro micro-batches. Returns (mean loss, pre-clip global grad norm).

    Each micro-batch loss is divided by n_micro, so the summed gradients equal the gradient of the
    mean loss over the whole batch, as if it had been one batch. `allow(loss, norm)` may veto the
    optimizer step (trainer/telemetry/anomaly.py); `probe` watches it (trainer/telemetry/probe.py).
    """
    total = torch.zeros((), device=params[0].device)
    for i, (x, y) in enumerate(micro_batches):
        with grad_sync(model, last_micro_batch=i == n_micro - 1):  # DDP: all-reduce once per step
            with ctx:
                _, loss = model(x, y)
            scaler.scale(loss / n_micro).backward()
        total += loss.detach()
    loss = total / n_micro
    scaler.unscale_(optimizer)  # no-op unless fp16
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    # FSDP: a DTensor over the shards (clipping takes it as it is); its full value is the global norm
    full_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if allow is None or allow(loss, full_norm):
        if grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm, foreach=True)
        if grad_clip_value > 0:
            torch.nn.utils.clip_grad_value_(params, grad_clip_value, foreach=True)
        if probe is not None:
            probe.before_step()
        scaler.step(optimizer)  # skipped by the scaler when fp16 gradients overflowed
        if probe is not None:
            probe.after_step()
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss, full_norm


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean loss over trainer.eval_steps validation batches: the first ones of the split, the same at every
    evaluation (so evals compare like with like) and disjoint across ranks."""
    t = run.cfg.trainer
    d = run.dist
    windows = validation_windows(run.val_tokens, run.seq_len, t.micro_batch_size, run.device, d.rank, d.world_size)
    run.step_model.eval()
    losses = torch.zeros(t.eval_steps, device=run.device)
    with autocast(t.precision, run.device), eval_mode(run.optimizer, run.cfg.optimizer):
        for i in range(t.eval_steps):
            _, losses[i] = run.step_model(*windows.next_batch())
    run.step_model.train()
    return mean_over_ranks(losses.mean(), d).item()


def save(run: Run, step: int, loss_window: tuple[float, int], train_seconds: float) -> None:
    """A checkpoint (every rank calls this): under FSDP each rank writes its shards, otherwise rank 0
    writes the whole model, which every rank holds."""
    d, sharded = run.dist, run.dist.strategy == "fsdp"
    # Inside eval mode, a schedule-free optimizer saves the averaged weights x and records eval mode
    # in its state, so that `optimizer.train()` after loading restores the training iterate exactly.
    with eval_mode(run.optimizer, run.cfg.optimizer):

        def write(directory):
            if sharded:
                ckpt_io.save_sharded(directory, run.model, run.optimizer)
            if d.is_main:
                state = {
                    "format": ckpt_io.STATE_FORMAT, "step": step, "optimizer_format": optimizer_format(d),
                    "optimizer": None if sharded else run.optimizer.state_dict(),
                    "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
                    "sampler": run.train_windows.state_dict(), "rng": rng_state(run.device),
                    "loss_window": list(loss_window), "train_seconds": train_seconds,
                    "model_config": vars(run.model.config).copy(),
                    "anomaly": run.anomaly.state_dict(),
                    "tokenizer": run.tokenizer.identity,
                }  # fmt: skip
                model = None if sharded else run.model
                ckpt_io.write_files(directory, model, state, OmegaConf.to_yaml(run.cfg), run.tokenizer)

        path = ckpt_io.save_checkpoint(run.run_dir / "checkpoints", step, write, d, run.cfg.trainer.keep_checkpoints)
    log.info("step %d: checkpoint %s", step, path)


def fit(run: Run, metrics: MetricsLogger) -> FitResult:
    t = run.cfg.trainer
    ctx = autocast(t.precision, run.device)
    params = [p for p in run.model.parameters() if p.requires_grad]
    d, guard = run.dist, run.anomaly
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * run.seq_len * d.world_size  # global
    flops_per_token, peak = run.model.flops_per_token(run.seq_len), peak_tflops(run.device)
    probe = stats_probe(run) if t.stats_interval else None
    loss_sum, loss_count = run.loss_window
    loss_sum = torch.tensor(float(loss_sum), device=run.device)
    clipped = torch.zeros((), device=run.device)  # steps clipped since the last log step
    val_loss = None
    if run.start_step == 0:  # the starting point of the val curve
        val_loss = evaluate(run)
        metrics.log(0, {"tokens": 0, "val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50))})
        log.info("step 0: val loss %.4f", val_loss)
    show = t.progress and d.is_main
    bar = tqdm(total=t.max_steps, initial=run.start_step, disable=not show, desc="train", unit="step")
    clock = TrainClock(run.train_seconds)  # paused around evals and checkpoints
    step, stopping = run.start_step, False
    with StopSignal() as stop:
        while step < t.max_steps and not stopping:
            lr = run.optimizer.param_groups[0]["lr"]
            batches = (run.train_windows.next_batch() for _ in range(t.grad_accum_steps))
            watched = probe if probe is not None and probe.wants(step + 1, t.stats_interval) else None
            loss, norm = train_step(
                run.step_model, batches, t.grad_accum_steps, run.optimizer, run.scaler, ctx, params,
                t.grad_clip, t.grad_clip_value, lambda loss, norm, s=step + 1: guard.allow(s, loss, norm), watched,
            )  # fmt: skip
            run.scheduler.step()
            step, clock.steps = step + 1, clock.steps + 1
            if run.optimizer_hook is not None:
                run.optimizer_hook(step)
            if guard.applied:  # known on the host only when an anomaly action syncs (else always True)
                loss_sum, loss_count = loss_sum + loss, loss_count + 1
            if t.grad_clip > 0:
                clipped += norm > t.grad_clip
            bar.update(1)
            last, log_step = step == t.max_steps, step % t.log_interval == 0 or step == t.max_steps
            # Ranks agree on stopping at log steps only (a collective), so they stop at the same step.
            stopping = guard.stop_reason is not None or (
                stop.signum is not None
                if not d.enabled
                else log_step and any_rank(stop.signum is not None, d, run.device)
            )
            record = {}
            if log_step:  # host syncs: log steps only
                train_loss = mean_over_ranks(loss_sum, d).item() / max(loss_count, 1)
                tok_s = clock.steps * tokens_per_step / clock.lap()
                record.update({"train/loss": train_loss, "lr": lr, "grad_norm": norm.item(), "tokens_per_s": tok_s,
                               "time/train_s": clock.seconds(),
                               "memory/optimizer_state_mb": state_bytes_measured(run.optimizer) / 2**20})  # fmt: skip
                if t.grad_clip > 0:
                    record.update({"grad/clip_coef": min(1.0, t.grad_clip / (record["grad_norm"] + 1e-6)),
                                   "grad/clipped_steps": int(clipped.item())})  # fmt: skip
                    clipped.zero_()
                record.update(perf_record(tok_s / d.world_size, flops_per_token, run.device, peak))
                record.update(guard.log_record())
                if watched is not None and watched.ready:
                    stats = watched.result()
                    record.update(stats)
                    record["update/ratio_log10/by_layer"] = watched.ratios_by_layer(stats)  # a W&B histogram
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                loss_sum.zero_()
                loss_count = 0
            if step % t.eval_interval == 0 or last:
                clock.pause()
                record.setdefault("time/train_s", clock.seconds())
                val_loss = evaluate(run)
                record.update({"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50))})
                log.info("step %d: val loss %.4f", step, val_loss)
            if record:
                metrics.log(step, {"tokens": step * tokens_per_step, **record})
            if step % t.ckpt_interval == 0 or last or stopping:
                clock.pause()
                save(run, step, (loss_sum.item(), loss_count), clock.seconds())
            if record or step % t.ckpt_interval == 0:  # keep eval and checkpoint time out of tokens/s
                clock.restart()
    bar.close()
    return FitResult(step, val_loss, stop.signum if stopping and guard.stop_reason is None else None, guard.stop_reason)


def stats_probe(run: Run) -> StatsProbe:
    fn, previous = family_stats(run.cfg.optimizer)
    return StatsProbe(run.model, run.optimizer, fn, previous)


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float, top_k: int, seed: int):
    """Continue `prompt` (used at the end of a run and by scripts/sample.py)."""
    device = next(model.parameters()).device
    ids = tokenizer.encode_batch([prompt])[0] if prompt else np.zeros(0, dtype=np.int64)
    if len(ids) == 0:
        ids = np.array([tokenizer.eot_id or 0])
    idx = torch.as_tensor(ids, dtype=torch.long, device=device)[None]
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k or None, generator=gen)
    model.train(was_training)
    return tokenizer.decode(out[0].tolist())
