"""Training speed: one config's throughput, our loop against a minimal hand-written one, and compilation.

    python scripts/bench.py                                # one JSON line: tokens/s and ms/step of the default
    python scripts/bench.py model=gpt2 trainer.micro_batch_size=8 --steps 20
    python scripts/bench.py trainer.precision=fp32 --steps 50 --warmup 10
    python scripts/bench.py --profile 50     # then 50 steps under torch.profiler: the top ops by self time

    # The trainer's loop (fit: logging, statistics, anomaly checks at their default intervals) against
    # `baseline_steps` below over trainer.max_steps steps, interleaved in one process (the baseline catches up
    # at each of our log records): time per step, and wall time to the baseline's final val loss. First ours
    # compiles twice for a few steps in fresh processes (a machine that has run this shape before:
    # trainer.compile=auto then knows it compiles from the cache; --cold skips this). Issue 16's nano recipe:
    python scripts/bench.py --baseline model.block_size=64 trainer.micro_batch_size=12 trainer.max_steps=2000

    # Compilation: cold and warm compile seconds (fresh processes, an empty then a filled inductor cache),
    # then eager against compiled steps, alternating in one process:
    python scripts/bench.py --compile model.block_size=64 trainer.micro_batch_size=12

Positional arguments are the same Hydra overrides train.py takes. One JSON line per result. Other processes
on the machine slow both sides of a comparison alike only when they alternate, so compare ratios, not times.
In the single-config mode only optimizer steps are timed (data loading included, evaluation and
checkpoints not); the first --warmup steps are not timed, and `first_step_s` is the first one's time
(compilation included when compiled).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from trainer.entry.cli import config_or_exit, scratch_run

TOLERANCE = 0.002  # ours reaches the baseline's val loss within 0.2%: below the noise of a seed or of bf16 vs fp32
QUIET = ["trainer.progress=false", "logger.wandb.mode=disabled", "trainer.sample_tokens=0"]


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def single(args) -> None:
    run = scratch_run(args.overrides)

    from trainer.loop import optimizer_step, step_context
    from trainer.runtime import device_sync
    from trainer.telemetry.perf import peak_tflops

    t = run.cfg.trainer
    sc = step_context(run, guarded=False)  # the loop's step, without the anomaly guard's per-step read
    start = time.perf_counter()
    for i in range(args.warmup):
        optimizer_step(run, sc, i + 1)
        if i == 0:
            device_sync(run.device)
            first = time.perf_counter() - start
    device_sync(run.device)
    start = time.perf_counter()
    for i in range(args.steps):
        loss, _ = optimizer_step(run, sc, args.warmup + i + 1)
    loss.item()
    device_sync(run.device)
    elapsed = time.perf_counter() - start
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * run.seq_len
    tokens_per_s = args.steps * tokens_per_step / elapsed
    tflops = tokens_per_s * run.model.flops_per_token(run.seq_len) / 1e12
    peak = peak_tflops(run.device, run.numerics.precision.value)  # known GPUs in bf16/fp16 only
    emit(overrides=args.overrides, device=str(run.device), precision=run.numerics.name,
         compile=run.compiled is not None, threads=torch.get_num_threads(), params=run.model.num_params(),
         tokens_per_step=tokens_per_step, steps=args.steps, ms_per_step=round(1000 * elapsed / args.steps, 2),
         tokens_per_s=round(tokens_per_s, 1), first_step_s=round(first, 2) if args.warmup else None,
         achieved_tflops=round(tflops, 4), mfu=round(tflops / peak, 4) if peak else None)  # fmt: skip
    if args.profile:
        profile_steps(run, sc, args.profile, args.warmup + args.steps)


def profile_steps(run, sc, steps: int, done: int, top: int = 12) -> None:
    """torch.profiler over `steps` more steps: one JSON line per op, the `top` by self time (CPU, or CUDA on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    from trainer.loop import optimizer_step
    from trainer.runtime import device_sync

    cuda = run.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        for i in range(steps):
            optimizer_step(run, sc, done + i + 1)
        device_sync(run.device)
    events = prof.key_averages()
    self_us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(self_us(e) for e in events)
    for e in sorted(events, key=self_us, reverse=True)[:top]:
        emit(result="profile", op=e.key[:80], self_ms_per_step=round(self_us(e) / 1000 / steps, 3),
             share=round(self_us(e) / total, 3), calls_per_step=round(e.count / steps, 1))  # fmt: skip


# --- the baseline: a minimal eager loop of the same model, batches, init, lr schedule and clipping ---------------


def baseline_steps(cfg, train, steps: int, device: torch.device):
    """Yield after each of `steps` optimizer steps of a nanoGPT-style loop: forward, backward, clip, fused AdamW,
    set the lr (warmup, then cosine to the floor). Nothing else: no logging, statistics or anomaly checks.
    It draws the trainer's batches (WindowSampler, same seed), so that the losses compare step for step."""
    from models.minigpt import MiniGPT
    from trainer.data.sampling import WindowSampler

    t, o, s = cfg.trainer, cfg.optimizer, cfg.schedule
    torch.manual_seed(t.seed)
    model = MiniGPT(cfg.model.architecture(train.vocab)).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)
    batches = WindowSampler(train.tokens, train.seq_len, t.micro_batch_size, t.seed, device)
    for step in range(steps):
        warm = step / max(1, s.warmup_steps)
        decay_frac = (step - s.warmup_steps) / max(1, steps - s.warmup_steps)
        cosine = s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * decay_frac))
        for g in opt.param_groups:
            g["lr"] = o.lr * (warm if step < s.warmup_steps else cosine)
        _, loss = model(*batches.next_batch())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        yield model


class Split:
    """The train tokens, their vocabulary and the sequence length the baseline needs, from a built run."""

    def __init__(self, run):
        self.tokens, self.vocab, self.seq_len = run.train_windows.tokens, run.tokenizer.vocab_size, run.seq_len


@torch.no_grad()
def val_loss(model, run) -> float:
    """The trainer's evaluation (the first trainer.eval_steps val batches, in order) of a plain fp32 model."""
    from trainer.data.sampling import validation_windows

    t = run.cfg.trainer
    windows = validation_windows(run.val_tokens, run.seq_len, t.micro_batch_size, run.device)
    model.eval()
    loss = sum(model(*windows.next_batch())[1].item() for _ in range(t.eval_steps)) / t.eval_steps
    model.train()
    return loss


class Baseline:
    """The minimal loop, advanced a few steps at a time while our loop runs (see `race`), each portion timed."""

    def __init__(self, cfg, run):
        self.run, self.steps_done, self.times = run, 0, []
        self.loop = baseline_steps(cfg, Split(run), cfg.trainer.max_steps, run.device)

    def advance(self, to_step: int) -> float:
        """Train up to step `to_step`; the seconds it took."""
        start = time.perf_counter()
        while self.steps_done < to_step:
            t0 = time.perf_counter()
            self.model = next(self.loop)
            self.times.append(time.perf_counter() - t0)
            self.steps_done += 1
        return time.perf_counter() - start

    def finish(self) -> float:
        """The final val loss (its evaluation timed into the last step)."""
        start = time.perf_counter()
        loss = val_loss(self.model, self.run)
        self.times[-1] += time.perf_counter() - start
        return loss


def race(overrides: list[str], cfg, run) -> dict:
    """Our fit() and the baseline over trainer.max_steps steps, interleaved: at each of our log records the
    baseline catches up to our step, so that other processes on the machine slow both alike. Our time counts
    from setup_run (precision probe, compilation, evaluations and checkpoints included) with the baseline's
    portions taken out; the baseline's from model creation to its final evaluation."""
    from trainer.build import setup_run
    from trainer.loop import fit
    from trainer.telemetry.metrics import MetricsLogger

    base = Baseline(cfg, run)
    events, paused = [], [0.0]

    class Timed(MetricsLogger):  # metrics.jsonl as in a run; when each record came, less the baseline's time
        def log(self, step: int, record: dict) -> None:
            super().log(step, record)
            events.append((step, time.perf_counter() - paused[0], record))
            paused[0] += base.advance(step)

    ours_cfg = config_or_exit([*overrides, *QUIET])
    t = ours_cfg.trainer
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        ours = setup_run(ours_cfg, Path(tmp))
        metrics = Timed(Path(tmp), ours_cfg.logger.wandb, {})
        fit(ours, metrics)
        metrics.close()
    base.advance(t.max_steps)
    base_loss = base.finish()
    target = base_loss * (1 + TOLERANCE)
    reached = next(((s, at - start) for s, at, r in events if r.get("val/loss", math.inf) <= target), None)
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * ours.seq_len
    logged = [(s, r) for s, _, r in events if "tokens_per_s" in r]
    pairs = zip(logged, logged[1:], strict=False)
    windows = [(s - p, (s - p) * tokens_per_step / r["tokens_per_s"]) for (p, _), (s, r) in pairs]
    skip = logged[0][0]  # steps of our first log window (compilation), left out of both per-step figures
    return {
        "ours_ms": 1000 * sum(w for _, w in windows) / sum(n for n, _ in windows),
        "baseline_ms": 1000 * statistics.fmean(base.times[skip:-1]),
        "ours_s": reached[1] if reached else None, "ours_step": reached[0] if reached else None,
        "baseline_s": sum(base.times), "baseline_val_loss": base_loss,
        "ours_final_val_loss": [r["val/loss"] for _, _, r in events if "val/loss" in r][-1],
        "ours_numerics": ours.numerics.name, "ours_compiled": ours.compiled is not None,
    }  # fmt: skip


def compiled_run(overrides: list[str], steps: int) -> dict:
    """`python train.py OVERRIDES trainer.compile=true` for `steps` steps in a fresh process (in this one, the
    compilers' in-memory caches would make a second compile look cheaper than a new process finds it): it fills
    the compile cache and the ledger (trainer/compile.py) as a user's earlier run of this shape would have."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "train.py"), *overrides, *QUIET,
               "trainer.compile=true", f"trainer.max_steps={steps}", f"hydra.run.dir={tmp}/run"]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
        log = (Path(tmp) / "run" / "train.log").read_text().splitlines()
    said = [line.split("] ", 1)[-1] for line in log if "] compile: " in line]
    return {"process_s": round(seconds, 1), "log": said}


def baseline(args) -> None:
    """Interleaved races to the baseline's final val loss: per step, then in all."""
    run = scratch_run([*args.overrides, "trainer.compile=false"])  # the data and the config, for the baseline
    if not args.cold:  # a machine that has compiled this shape before: the cache and the compile ledger hold it
        for which in ("first", "second"):
            emit(result=f"warm_up_{which}", **compiled_run(args.overrides, 2 * run.cfg.trainer.log_interval))
    for r in range(args.races):
        o = race(args.overrides, run.cfg, run)
        common = {"round": r, "threads": torch.get_num_threads(), "ours_numerics": o["ours_numerics"],
                  "ours_compiled": o["ours_compiled"]}  # fmt: skip
        emit(result="per_step", ours_ms=round(o["ours_ms"], 2), baseline_ms=round(o["baseline_ms"], 2),
             ratio=round(o["ours_ms"] / o["baseline_ms"], 3), target="<= 1.0", **common)  # fmt: skip
        emit(result="race", steps=run.cfg.trainer.max_steps, baseline_s=round(o["baseline_s"], 1),
             baseline_val_loss=round(o["baseline_val_loss"], 4), ours_s=o["ours_s"] and round(o["ours_s"], 1),
             ours_step=o["ours_step"], ours_final_val_loss=round(o["ours_final_val_loss"], 4),
             ratio=o["ours_s"] and round(o["ours_s"] / o["baseline_s"], 3), target="<= 0.75", **common)  # fmt: skip


# --- compilation: cold and warm compile times, eager against compiled steady state -------------------------------


def compile_times(args) -> None:
    """Two fresh processes on an empty inductor cache (cold, then warm), then steps alternating in one process."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for which in ("cold", "warm"):
            cmd = [sys.executable, __file__, *args.overrides, "trainer.compile=true", "--steps", "5", "--warmup", "2"]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
            emit(result=f"compile_{which}", first_step_s=json.loads(out)["first_step_s"], overrides=args.overrides)
    from trainer.loop import optimizer_step, step_context

    runs = {mode: scratch_run([*args.overrides, f"trainer.compile={mode}"]) for mode in ("false", "true")}
    contexts = {mode: step_context(run, guarded=False) for mode, run in runs.items()}
    done = dict.fromkeys(runs, 0)
    times = {mode: [] for mode in runs}
    for r in range(args.rounds + 1):  # round 0 warms up (and compiles, from the cache filled above)
        for mode, run in runs.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                done[mode] += 1
                loss, _ = optimizer_step(run, contexts[mode], done[mode])
            loss.item()
            if r:
                times[mode].append((time.perf_counter() - start) / args.steps)
    eager, compiled = (statistics.median(times[m]) for m in ("false", "true"))
    emit(result="compile_steady_state", eager_ms=round(1000 * eager, 2), compiled_ms=round(1000 * compiled, 2),
         ratio=round(compiled / eager, 3), numerics=runs["true"].numerics.name, rounds=args.rounds,
         steps_per_round=args.steps, threads=torch.get_num_threads())  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (per round with --compile)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, caches)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="then profile N steps: the top ops")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--baseline", action="store_true", help="our loop against a minimal eager loop")
    mode.add_argument("--compile", action="store_true", help="cold/warm compile seconds, eager vs compiled steps")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (--compile)")
    parser.add_argument("--races", type=int, default=1, help="interleaved races to the baseline's loss (--baseline)")
    parser.add_argument("--cold", action="store_true", help="--baseline without first compiling ours (twice)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.baseline:
        baseline(args)
    elif args.compile:
        args.steps = args.steps or 30
        compile_times(args)
    else:
        args.steps = args.steps or 30
        single(args)


if __name__ == "__main__":
    main()
