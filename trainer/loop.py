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
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from optim.builder import eval_mode, family_stats
from trainer import checkpoint as ckpt_io
from trainer.build import Run
from trainer.compile import uncompiled
from trainer.data.sampling import validation_windows
from trainer.distributed import any_rank, grad_sync, mean_over_ranks
from trainer.runtime import StopSignal, autocast
from trainer.telemetry.metrics import MetricsLogger
from trainer.telemetry.perf import TrainClock
from trainer.telemetry.probe import StatsProbe
from trainer.telemetry.train_log import TrainLog

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    step: int
    val_loss: float | None
    interrupted_by: int | None  # the signal number when stopped early
    anomaly: str | None = None  # why trainer.anomaly stopped the run


@dataclass
class StepContext:
    """What every optimizer step needs, built once (`step_context`) by the loop, scripts/bench.py,
    bench_stats.py and lr_find.py, so that they all time and train the same step."""

    model: torch.nn.Module  # what is called: wrapped for DDP or FSDP, compiled when trainer.compile
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    params: Sequence[torch.nn.Parameter]  # the trainable ones, whose gradient norm is logged and clipped
    autocast: AbstractContextManager
    grad_accum_steps: int  # micro-batches per optimizer step
    grad_clip: float = 0.0  # by global norm
    grad_clip_value: float = 0.0  # by value
    allow: Callable[[int, torch.Tensor, torch.Tensor], bool] | None = None  # (step, loss, norm): may veto


def step_context(run: Run, guarded: bool = True) -> StepContext:
    """The run's step; `guarded` puts the anomaly guard's veto in it (trainer/telemetry/anomaly.py)."""
    t = run.cfg.trainer
    return StepContext(
        run.step_model, run.optimizer, run.scaler, [p for p in run.model.parameters() if p.requires_grad],
        autocast(run.numerics, run.device), t.grad_accum_steps, t.grad_clip, t.grad_clip_value,
        run.anomaly.allow if guarded else None,
    )  # fmt: skip


def train_step(
    sc: StepContext, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], step: int = 0,
    probe: StatsProbe | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Optimizer step `step` (from 1) over sc.grad_accum_steps micro-batches. Returns (mean loss, pre-clip
    global grad norm).

    Each micro-batch loss is divided by the number of micro-batches, so the summed gradients equal the
    gradient of the mean loss over the whole batch, as if it had been one batch. `sc.allow` may veto the
    optimizer step; `probe` watches it (trainer/telemetry/probe.py).
    """
    n_micro, params = sc.grad_accum_steps, sc.params
    total = torch.zeros((), device=params[0].device)
    for i, (x, y) in enumerate(micro_batches):
        with grad_sync(sc.model, last_micro_batch=i == n_micro - 1):  # DDP: all-reduce once per step
            with sc.autocast:
                _, loss = sc.model(x, y)
            sc.scaler.scale(loss / n_micro).backward()
        total += loss.detach()
    loss = total / n_micro
    sc.scaler.unscale_(sc.optimizer)  # no-op unless fp16
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    # FSDP: a DTensor over the shards (clipping takes it as it is); its full value is the global norm
    full_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if sc.allow is None or sc.allow(step, loss, full_norm):
        if sc.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, sc.grad_clip, norm, foreach=True)
        if sc.grad_clip_value > 0:
            torch.nn.utils.clip_grad_value_(params, sc.grad_clip_value, foreach=True)
        if probe is not None:
            probe.before_step()
        sc.scaler.step(sc.optimizer)  # skipped by the scaler when fp16 gradients overflowed
        if probe is not None:
            probe.after_step()
    sc.scaler.update()
    sc.optimizer.zero_grad(set_to_none=True)
    return loss, full_norm


def optimizer_step(run: Run, sc: StepContext, step: int, probe: StatsProbe | None = None):
    """Step `step` (from 1) of a run, as the loop takes it: the sampler's next micro-batches, `train_step`,
    the schedule, then the optimizer's hook (Sophia's Hessian refresh). Returns (loss, norm)."""
    batches = (run.train_windows.next_batch() for _ in range(sc.grad_accum_steps))
    loss, norm = train_step(sc, batches, step, probe)
    run.scheduler.step()
    if run.optimizer_hook is not None:
        run.optimizer_hook(step)
    return loss, norm


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean loss over trainer.eval_steps validation batches: the first ones of the split, the same at every
    evaluation (so evals compare like with like) and disjoint across ranks."""
    t = run.cfg.trainer
    d = run.dist
    windows = validation_windows(run.val_tokens, run.seq_len, t.micro_batch_size, run.device, d.rank, d.world_size)
    model = uncompiled(run.step_model)  # a few batches now and then: compiling them too would double the compile
    model.eval()
    losses = torch.zeros(t.eval_steps, device=run.device)
    with autocast(run.numerics, run.device), eval_mode(run.optimizer, run.cfg.optimizer):
        for i in range(t.eval_steps):
            _, losses[i] = model(*windows.next_batch())
    model.train()
    return mean_over_ranks(losses.mean(), d).item()


def save(run: Run, step: int) -> None:
    """A checkpoint of `run.progress` (every rank calls this; trainer/checkpoint.py writes it)."""
    # Inside eval mode, a schedule-free optimizer saves the averaged weights x and records eval mode
    # in its state, so that `optimizer.train()` after loading restores the training iterate exactly.
    with eval_mode(run.optimizer, run.cfg.optimizer):
        path = ckpt_io.save(
            run.run_dir / "checkpoints", step, run.model, run.optimizer, run.stateful, run.tokenizer,
            OmegaConf.to_yaml(run.cfg), run.dist, run.cfg.trainer.keep_checkpoints,
        )  # fmt: skip
    log.info("step %d: checkpoint %s", step, path)


def validate(run: Run, step: int, record: dict) -> float:
    """Evaluate into `record` (val loss and perplexity) and the log."""
    val_loss = evaluate(run)
    record.update({"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50))})
    log.info("step %d: val loss %.4f", step, val_loss)
    return val_loss


def fit(run: Run, metrics: MetricsLogger) -> FitResult:
    t, d, guard, progress = run.cfg.trainer, run.dist, run.anomaly, run.progress
    sc = step_context(run)
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * run.seq_len * d.world_size  # global
    train_log = TrainLog(run.optimizer, run.model.flops_per_token(run.seq_len), run.device, d, t.grad_clip,
                         run.numerics.precision.value, progress.loss_window)  # fmt: skip
    probe = stats_probe(run) if t.stats_interval else None
    val_loss = None
    began = time.perf_counter()  # to the end of the first step: a compiled run's compile time (and one evaluation)
    if progress.step == 0:  # the starting point of the val curve
        record = {"tokens": 0}
        val_loss = validate(run, 0, record)
        metrics.log(0, record)
    bar = tqdm(total=t.max_steps, initial=progress.step, disable=not (t.progress and d.is_main), desc="train",
               unit="step")  # fmt: skip
    clock = TrainClock(progress.train_seconds)  # paused around evals and checkpoints
    start = step = progress.step
    stopping = False
    with StopSignal() as stop:
        while step < t.max_steps and not stopping:
            lr = run.optimizer.param_groups[0]["lr"]
            watched = probe if probe is not None and probe.wants(step + 1, t.stats_interval) else None
            loss, norm = optimizer_step(run, sc, step + 1, watched)
            if run.compiled is not None and step == start:  # the compiled run's first step: it compiled
                note_compile(run, time.perf_counter() - began)
            step, clock.steps = step + 1, clock.steps + 1
            train_log.add(loss, norm, guard.applied)  # applied: known on the host only when an anomaly action syncs
            bar.update(1)
            last, log_step = step == t.max_steps, step % t.log_interval == 0 or step == t.max_steps
            # Ranks agree on stopping at log steps only (a collective), so they stop at the same step.
            stopping = guard.stop_reason is not None or (
                stop.signum is not None
                if not d.enabled
                else log_step and any_rank(stop.signum is not None, d, run.device)
            )
            record = {}
            if log_step:
                record = train_log.record(lr, norm, clock, tokens_per_step, guard.log_record(), watched)
                loss_s, tok_s = f"{record['train/loss']:.4f}", f"{record['tokens_per_s']:,.0f}"
                bar.set_postfix(loss=loss_s, lr=f"{lr:.2e}", tok_s=tok_s)
            if step % t.eval_interval == 0 or last:
                clock.pause()
                record.setdefault("time/train_s", clock.seconds())
                val_loss = validate(run, step, record)
            if record:
                metrics.log(step, {"tokens": step * tokens_per_step, **record})
            if step % t.ckpt_interval == 0 or last or stopping:
                clock.pause()
                progress.step, progress.loss_window, progress.train_seconds = step, train_log.window(), clock.seconds()
                save(run, step)
            if record or step % t.ckpt_interval == 0:  # keep eval and checkpoint time out of tokens/s
                clock.restart()
    bar.close()
    return FitResult(step, val_loss, stop.signum if stopping and guard.stop_reason is None else None, guard.stop_reason)


def note_compile(run: Run, seconds: float) -> None:
    """Log the time to the end of the first compiled step (the first evaluation, eager, included), and
    keep it in the compile ledger (trainer/compile.py), which trainer.compile=auto reads to know that this shape
    compiles from the cache next time, and how long that takes."""
    log.info("compile: %.1f s to the end of the first step (compiling and the first evaluation included)", seconds)
    if run.dist.is_main and run.ledger is not None:
        run.ledger.record(run.compiled, seconds)


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
