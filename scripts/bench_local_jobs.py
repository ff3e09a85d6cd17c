"""Benchmark launches side by side: the same runs with --local-jobs 1 (one launch, torch's default threads)
and --local-jobs N (N launches at once, cores / N threads per job), alternating; one JSON line per batch.

    python scripts/bench_local_jobs.py                          # cpu preset, size s, 5 tokens/param, 2 rounds
    python scripts/bench_local_jobs.py --size m --budget 2.5 --local-jobs 2 --rounds 3

The runs are the preset's optimizers at their defaults with seeds 1 and 2 (8 runs for the cpu preset), into
fresh directories under --out every time, through the benchmark's own HydraLauncher.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from trainer.lab.benchmark.config import load_config, settings
from trainer.lab.benchmark.jobs import make_job
from trainer.lab.benchmark.launch import HydraLauncher, threads_per_job


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--size", default="s", help="a size name of the preset")
    parser.add_argument("--budget", type=float, default=5.0, help="tokens per parameter of every run")
    parser.add_argument("--local-jobs", type=int, default=2, help="the N compared with 1")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="runs/bench_local_jobs")
    args = parser.parse_args(argv)
    cfg = load_config(args.preset, [])
    chosen = [s for s in settings(cfg) if s.size.name == args.size]
    jobs = [make_job(cfg, s, s.defaults, args.budget, seed, "bench") for s in chosen for seed in (1, 2)]
    for r in range(args.rounds):
        for n in (1, args.local_jobs):
            out = Path(args.out) / f"round{r}-local{n}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            HydraLauncher(out, [], poll_s=0.5, local_jobs=n).run(jobs, out / "runs", lambda job: None)
            print(json.dumps({"round": r, "local_jobs": n, "threads_per_job": threads_per_job(n) or "default",
                              "runs": len(jobs), "steps_per_run": jobs[0].steps,
                              "wall_s": round(time.perf_counter() - start, 1)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
