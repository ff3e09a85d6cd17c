"""The command line of scripts/benchmark.py: check, count and estimate, run what is left, write the report."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf

from trainer.errors import ConfigError, exit_with_error
from trainer.lab.benchmark.analysis import analyze
from trainer.lab.benchmark.config import load_config, prepare, settings
from trainer.lab.benchmark.estimate import estimate_seconds, step_seconds
from trainer.lab.benchmark.launch import HydraLauncher, Launcher, threads_per_job
from trainer.lab.benchmark.protocol import Benchmark, machine_seconds
from trainer.lab.benchmark.report import write_report

REPO = Path(__file__).resolve().parents[3]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/benchmark.py", description=__doc__)
    p.add_argument("overrides", nargs="*", help="benchmark config overrides, key=value (e.g. trials=8 seeds=[1,2,3])")
    p.add_argument("--preset", default="cpu", help="configs/benchmark/NAME.yaml, or a path to a YAML (default cpu)")
    p.add_argument("--out", default=None, help="where the runs go (default runs/benchmark/<preset>)")
    p.add_argument("--report", default=None, help="where report.md and the figures go (default: --out)")
    p.add_argument("--hydra", action="append", default=[], metavar="ARG",
                   help="an argument for every `train.py -m` launch, e.g. --hydra +launcher=slurm "
                        "--hydra hydra.launcher.partition=gpu (repeat it)")  # fmt: skip
    p.add_argument("--local-jobs", type=int, default=1, metavar="N",
                   help="N launches at once on this machine, each job with cores / N torch threads (default 1: "
                        "one launch, torch's default threads; 2 on a 2-core CPU: see docs/comparing.md)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="check, count the runs, estimate the time, and stop")
    p.add_argument("--report-only", action="store_true", help="write the report from the runs there, run nothing")
    p.add_argument("--no-probe", action="store_true", help="no timing probe (the estimate then needs finished runs)")
    return p


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "unknown (no finished runs to time, and --no-probe)"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()  # fmt: skip
        return (sha or "unknown") + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _stop(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds into the launch, which stops its runs (launch.py)


def main(argv: list[str] | None = None, launcher: Callable[[Path], Launcher] | None = None) -> int:
    args = parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _stop)  # SIGTERM (a cluster, `kill`) stops the runs as Ctrl-C does
    try:
        return _main(args, argv, launcher)
    except KeyboardInterrupt:
        print("stopped; the finished runs are kept: run the same command again to continue", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace, argv: list[str] | None, launcher: Callable[[Path], Launcher] | None) -> int:
    try:
        cfg = load_config(args.preset, args.overrides)
        out = Path(args.out or Path("runs") / "benchmark" / Path(args.preset).stem)
        sets = settings(cfg)  # every config composed and checked before any run
        if args.local_jobs < 1:
            raise ConfigError(f"--local-jobs={args.local_jobs} must be at least 1")
        made = launcher(out) if launcher else HydraLauncher(out, args.hydra, local_jobs=args.local_jobs)
        bench = Benchmark(cfg, sets, out, made)
        plan, outcomes = bench.plan()
        out.mkdir(parents=True, exist_ok=True)
        (out / "benchmark.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        if not args.report_only:
            if plan.runs:
                prepare(sets)  # tokenise each corpus once (the probe and every job read the cache)
            threads = threads_per_job(args.local_jobs)
            step_s = step_seconds(cfg, bench.collect(outcomes), out, not args.no_probe and plan.runs > 0, threads)
            seconds = estimate_seconds(cfg, plan, outcomes, step_s, args.local_jobs)
            total = sum(plan.total.values())
            print(f"{plan.runs} runs to go of {total} (tuning {plan.todo['tune']}, tuned {plan.todo['tuned']}"
                  f"{' at most' if any(o.tune is None for o in outcomes) else ''}, defaults {plan.todo['default']}; "
                  f"{cfg.trials} tuning trials per optimizer and size); estimated {_hours(seconds)} on this machine; "
                  f"runs in {out / 'runs'}", flush=True)  # fmt: skip
            if args.dry_run:
                return 0
            outcomes = bench.run(plan)
        else:
            outcomes = bench.collect(outcomes)
        result = analyze(cfg, outcomes)
        header = {"preset": args.preset, "command": "python scripts/benchmark.py " + shlex.join(argv or sys.argv[1:]),
                  "commit": _commit(), "date": time.strftime("%Y-%m-%d %H:%M"), "machine_s": machine_seconds(out),
                  "device": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}"}  # fmt: skip
        paths = write_report(cfg, result, header, Path(args.report) if args.report else out)
        print("wrote " + ", ".join(map(str, paths)))
        return 0
    except ConfigError as e:
        exit_with_error(str(e))
