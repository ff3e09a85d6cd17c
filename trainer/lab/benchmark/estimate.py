"""How long the runs still to run will take on this machine, printed before the first one starts.

Seconds per optimizer step, per (size, optimizer): the median over its finished runs in this benchmark
(training seconds / steps), or else a probe: a few steps of its tuning run timed as scripts/bench.py times
them (the trainer's own optimizer_step, after untimed warm-up steps), cached in OUT/probe.json. A run then
costs its steps, its evaluations (a forward pass is about a third of a training step) and a fixed start-up;
each launch of train.py -m costs a process start. With a launcher that runs jobs elsewhere (SLURM), the
estimate is still this machine's time.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from trainer.lab.benchmark.config import BenchmarkConfig, Setting, tune_budget
from trainer.lab.benchmark.jobs import make_job
from trainer.lab.benchmark.protocol import Outcome, Plan

# From the smoke benchmark's launch logs on the 2-core development machine (shared with other agents, so
# generous): a job's wall time beyond its training and evaluation (Hydra's job set-up, building the run, its
# checkpoint) was 0.6 s in a quiet moment; a `python train.py -m` took 9-13 s from start to its first job
# (imports, composing every job of the batch).
JOB_OVERHEAD_S = 1.0
LAUNCH_OVERHEAD_S = 10.0


def _key(s: Setting) -> str:
    return f"{s.size.name}/{s.optimizer}"


def measured_step_s(outcomes: list[Outcome]) -> dict[str, float]:
    """Median training seconds per step over each setting's finished runs."""
    out = {}
    for o in outcomes:
        runs = list(o.tune_runs) + [r for table in o.tables.values() for runs in table.values() for r in runs]
        per_step = [r.train_s / j.steps for j, r in runs if r.status == "ok" and r.train_s and j.steps]
        if per_step:
            out[_key(o.setting)] = statistics.median(per_step)
    return out


def probe_step_s(cfg: BenchmarkConfig, s: Setting, threads: int | None = None, steps: int = 10,
                 warmup: int = 2) -> float:  # fmt: skip
    """Seconds per optimizer step of this setting's tuning run, with `threads` torch threads as its jobs will
    have (None: torch's default): the median of `steps` steps after `warmup` (the median, so that a step another
    process delayed does not set the estimate)."""
    import torch

    from trainer.entry.cli import scratch_run
    from trainer.loop import optimizer_step, step_context

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        run = scratch_run(list(make_job(cfg, s, s.defaults, tune_budget(s.size), cfg.tune_seed, "probe").overrides))
        sc = step_context(run, guarded=False)
        for i in range(warmup):
            optimizer_step(run, sc, i + 1)
        times = []
        for i in range(steps):
            start = time.perf_counter()
            loss, _ = optimizer_step(run, sc, warmup + i + 1)
            loss.item()  # waits for the device
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        torch.set_num_threads(before)


def step_seconds(cfg: BenchmarkConfig, outcomes: list[Outcome], out: Path, probe: bool,
                 threads: int | None = None) -> dict[str, float]:  # fmt: skip
    """Per setting: measured if it has finished runs, else probed (cached in probe.json) when probe is True."""
    found = measured_step_s(outcomes)
    cache_path = out / "probe.json"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    for o in outcomes:
        key = _key(o.setting)
        probed = f"{key}, {threads or 'default'} threads"
        if key in found:
            continue
        if probed not in cache and probe:
            cache[probed] = probe_step_s(cfg, o.setting, threads)
            out.mkdir(parents=True, exist_ok=True)
            cache_path.write_text(json.dumps(cache, indent=1) + "\n")
        if probed in cache:
            found[key] = cache[probed]
    return found


def run_seconds(cfg: BenchmarkConfig, step_s: float, steps: int) -> float:
    evals = cfg.evals_per_run + 1  # step 0, then evals_per_run more (the last at the end)
    return steps * step_s + evals * cfg.eval_batches * step_s / 3 + JOB_OVERHEAD_S


def estimate_seconds(cfg: BenchmarkConfig, plan: Plan, outcomes: list[Outcome], step_s: dict[str, float],
                     local_jobs: int = 1) -> float | None:  # fmt: skip
    """Seconds for everything the plan has left, `local_jobs` runs at a time; None when a setting has no timing
    (no probe, no runs)."""
    if any(_key(o.setting) not in step_s for o in outcomes):
        return None if plan.runs else 0.0
    by_key = {_key(o.setting): o.setting for o in outcomes}
    total = 0.0
    for key, n in plan.tuning_left.items():
        s = by_key[key]
        total += n * run_seconds(cfg, step_s[key], s.steps(tune_budget(s.size)))
    for j in plan.jobs:
        total += run_seconds(cfg, step_s[f"{j.size}/{j.optimizer}"], j.steps)
    for o in outcomes:  # tuned tables of searches still running: the defaults' budgets and seeds
        if o.tune is None:
            key = _key(o.setting)
            size = o.setting.size
            budgets = {*size.budgets, *(size.baseline_budgets if o.setting.optimizer == cfg.baseline else [])}
            total += sum(run_seconds(cfg, step_s[key], o.setting.steps(b)) * len(cfg.seeds) for b in budgets)
    launches = (max(plan.tuning_left.values(), default=0) + 1) + (1 if plan.runs else 0)
    return total / max(1, local_jobs) + launches * LAUNCH_OVERHEAD_S
