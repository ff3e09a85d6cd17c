"""+experiment=speedrun against the default run (`make train`): wall time of each, as a user runs them.

    python scripts/bench_speedrun.py                 # default, then speedrun; one JSON line each, then the ratio
    python scripts/bench_speedrun.py --rounds 2      # default, speedrun, speedrun, default (drift cancels out)

Each run is its own `python train.py` process in a throw-away run directory, timed from launch to exit
(start-up, data, the precision probe, compilation, evaluations, checkpoints and the end-of-run sample
included). Both use the same data cache (data.cache_dir), so both find the token cache and the compiled
code the other left. The speedrun counts only if its final val loss is at or below the default run's.
Extra arguments are overrides given to both runs (e.g. data.cache_dir=...). Other processes on the
machine slow two runs alike only if the load stays the same: `ratio` is of wall times (the target's
measure), `cpu_ratio` of the processes' CPU times, which a busy machine disturbs far less (with
OMP_NUM_THREADS=1 it is the work each run does); use --rounds 2 or more on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {"default": [], "speedrun": ["+experiment=speedrun"]}


def train(name: str, overrides: list[str], run_dir: Path) -> dict:
    """One `python train.py` of RUNS[name]: wall seconds, final val loss, and what it chose (from its log)."""
    cmd = [sys.executable, str(REPO / "train.py"), *RUNS[name], *overrides, f"hydra.run.dir={run_dir}",
           "trainer.progress=false"]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if proc.returncode != 0:
        sys.exit(f"error: {name} run failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "val/loss" in r][-1]
    log = (run_dir / "train.log").read_text()
    chose = [line.split("] ", 1)[-1] for line in log.splitlines() if "] precision: " in line or "] compile: " in line]
    return {"run": name, "wall_s": round(seconds, 1), "cpu_s": round(cpu, 1), "steps": final["step"],
            "final_val_loss": round(final["val/loss"], 4), "train_s": round(final.get("time/train_s", 0.0), 1),
            "chose": chose}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs")
    parser.add_argument("--rounds", type=int, default=1, help="pairs of runs, in ABBA order")
    args = parser.parse_args(argv)
    pairs = [("default", "speedrun"), ("speedrun", "default")]
    order = [name for r in range(args.rounds) for name in pairs[r % 2]]
    results = {"default": [], "speedrun": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(order):
            result = train(name, args.overrides, Path(tmp) / f"{i}-{name}")
            results[name].append(result)
            print(json.dumps(result), flush=True)
    default_loss = min(r["final_val_loss"] for r in results["default"])
    reached = all(r["final_val_loss"] <= default_loss for r in results["speedrun"])

    def ratio(key: str) -> float:  # speedrun over default, medians over the rounds
        median = {name: statistics.median(r[key] for r in runs) for name, runs in results.items()}
        return median["speedrun"] / median["default"]

    print(json.dumps({"result": "speedrun_vs_default", "ratio": round(ratio("wall_s"), 3),
                      "cpu_ratio": round(ratio("cpu_s"), 3),
                      "reached_default_val_loss": reached, "default_val_loss": default_loss, "rounds": args.rounds,
                      "target": "<= 0.333"}))  # fmt: skip


if __name__ == "__main__":
    main()
