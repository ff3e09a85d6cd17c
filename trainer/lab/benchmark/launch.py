"""Running a batch of jobs through Hydra's launchers, and noticing each run as it finishes.

One batch is one `python train.py -m` (see jobs.py), with the launcher the user chose: Hydra's basic one
(one job after another, in one process), `+launcher=local` (submitit, a process per job) or
`+launcher=slurm` (a SLURM job per run, the benchmark waiting on this machine); with --local-jobs N, N of
them at once over disjoint shares of the batch, each job with cores / N torch threads. Output goes to
OUT/logs/launch-NNNN.log. While it runs, the run directories are polled, so the progress bar moves as
runs finish. When it ends, a run that started but did not finish is marked failed (results.MARKER) with its
`error:` line or the last line of its train.log. A run that never started, or that a signal stopped (it
checkpointed: a SIGTERM from the cluster, Ctrl-C), is not a failure: the benchmark stops with one line, and
running it again resumes those runs. Ctrl-C or SIGTERM to the benchmark itself passes SIGTERM on to the launch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from trainer.errors import ConfigError
from trainer.lab.benchmark.jobs import GROUP, Job, write_job
from trainer.lab.benchmark.results import last_line, mark_failed, read_run

TRAIN = Path(__file__).resolve().parents[3] / "train.py"


def error_lines(log: Path) -> dict[str, str]:
    """The `error:` line of each job in a basic-launcher log, where Hydra prints `#N : +bench_job=KEY` before
    each job's output (the submitit launchers keep each job's output in .submitit/ instead)."""
    errors, key = {}, None
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return errors
    for line in lines:
        m = re.search(rf"#\d+ : .*\+{GROUP}=(\S+)", line)
        if m:
            key = m.group(1)
        elif line.startswith("error: ") and key is not None:
            errors.setdefault(key, line[len("error: "):].strip()[:300])
    return errors


class Launcher(Protocol):
    def run(self, jobs: list[Job], runs_dir: Path, done: Callable[[Job], None]) -> None:
        """Run the jobs, each into runs_dir/<job.key>; call done(job) as each one ends (in any order)."""


def threads_per_job(local_jobs: int) -> int | None:
    """With several launches at once, each job's torch threads (OMP_NUM_THREADS): the cores shared out. None
    for one launch (torch's own default). On a small CPU this matters more than it seems: two threads of a tiny
    model wait on each other whenever another process holds a core (docs/comparing.md has the figures)."""
    return None if local_jobs <= 1 else max(1, (os.cpu_count() or 1) // local_jobs)


class HydraLauncher:
    def __init__(self, out: Path, hydra_args: list[str], poll_s: float = 2.0, local_jobs: int = 1):
        self.jobs_dir, self.logs = out / "jobs", out / "logs"
        self.hydra_args, self.poll_s, self.local_jobs = list(hydra_args), poll_s, max(1, local_jobs)

    def command(self, jobs: list[Job], runs_dir: Path) -> list[str]:
        keys = ",".join(j.key for j in jobs)
        return [sys.executable, str(TRAIN), "-m", "--config-dir", str(self.jobs_dir.resolve()), f"+{GROUP}={keys}",
                f"hydra.sweep.dir={runs_dir.resolve()}", *self.hydra_args]  # fmt: skip

    def run(self, jobs: list[Job], runs_dir: Path, done: Callable[[Job], None]) -> None:
        """One `train.py -m` per group of jobs, `local_jobs` groups at once (round-robin, so each gets a share of
        every size and budget); each group's runs are then classified by finish()."""
        for job in jobs:
            write_job(job, self.jobs_dir)
        self.logs.mkdir(parents=True, exist_ok=True)
        number = len(list(self.logs.glob("launch-*.log"))) + 1
        groups = [g for g in (jobs[i :: self.local_jobs] for i in range(self.local_jobs)) if g]
        waiting = [{job.key: job for job in g} for g in groups]
        logs = [self.logs / f"launch-{number + i:04d}.log" for i in range(len(groups))]
        threads = threads_per_job(self.local_jobs)
        env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})

        def collect() -> None:
            for group in waiting:
                for key, job in list(group.items()):
                    if read_run(runs_dir / key, job.steps).status != "pending":
                        done(group.pop(key))

        procs = []
        try:
            for group, log in zip(groups, logs, strict=True):
                with open(log, "w") as out:  # the child keeps its own copy of the file
                    procs.append(subprocess.Popen(self.command(group, runs_dir), stdout=out,
                                                  stderr=subprocess.STDOUT, cwd=TRAIN.parent, env=env))  # fmt: skip
            while any(p.poll() is None for p in procs):
                time.sleep(self.poll_s)
                collect()
        except BaseException:  # Ctrl-C or SIGTERM: the runs checkpoint and stop, and a re-run resumes them
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                p.wait(timeout=120)
            raise
        collect()
        problems = []
        for group, log, p in zip(waiting, logs, procs, strict=True):
            try:
                finish(group, runs_dir, log, p.returncode, done)
            except ConfigError as e:
                problems.append(str(e))
        if problems:
            raise ConfigError("; ".join(problems))


INTERRUPTED = "checkpoint saved; continue with trainer.resume=auto"  # what a run stopped by a signal logs last
SIGNALLED = {130, 143}  # 128 + SIGINT, 128 + SIGTERM: what train.py exits with after such a stop


def finish(waiting: dict[str, Job], runs_dir: Path, log: Path, returncode: int, done: Callable[[Job], None]) -> None:
    """After a launch: mark each run that started and ended without its final evaluation as failed, unless it
    (or the whole launch) was stopped by a signal, which a re-run resumes. Raise when runs were left behind."""
    if returncode < 0 or returncode in SIGNALLED:
        raise ConfigError(f"the launch was stopped by a signal (exit code {returncode}) with {len(waiting)} run(s) "
                          f"unfinished; run the benchmark again to resume them (log: {log})")  # fmt: skip
    errors = error_lines(log)
    left = []
    for key in list(waiting):
        path = runs_dir / key
        if (path / ".hydra").is_dir() and INTERRUPTED not in last_line(path):
            mark_failed(path, f"ended without a final evaluation: {errors.get(key) or last_line(path)} (log: {log})")
            done(waiting.pop(key))
        else:
            left.append(key)
    if left:
        raise ConfigError(f"the launcher exited (code {returncode}) with {len(left)} run(s) not started or "
                          f"interrupted; see {log}; run the benchmark again to resume")  # fmt: skip
