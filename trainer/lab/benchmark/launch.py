"""Running a batch of jobs through Hydra's launchers, and noticing each run as it finishes.

One batch is one `python train.py -m` (see jobs.py), with the launcher the user chose: Hydra's basic one
(one job after another, in one process), `+launcher=local` (submitit, a process per job) or
`+launcher=slurm` (a SLURM job per run, the benchmark waiting on this machine). Its output goes to
OUT/logs/launch-NNNN.log. While it runs, the run directories are polled, so the progress bar moves as
runs finish. When it ends, a run that started but did not finish is marked failed (results.MARKER) with its
`error:` line or the last line of its train.log. A run that never started, or that a signal stopped (it
checkpointed: a SIGTERM from the cluster, Ctrl-C), is not a failure: the benchmark stops with one line, and
running it again resumes those runs. Ctrl-C or SIGTERM to the benchmark itself passes SIGTERM on to the launch.
"""

from __future__ import annotations

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


class HydraLauncher:
    def __init__(self, out: Path, hydra_args: list[str], poll_s: float = 2.0):
        self.jobs_dir, self.logs = out / "jobs", out / "logs"
        self.hydra_args, self.poll_s = list(hydra_args), poll_s

    def command(self, jobs: list[Job], runs_dir: Path) -> list[str]:
        keys = ",".join(j.key for j in jobs)
        return [sys.executable, str(TRAIN), "-m", "--config-dir", str(self.jobs_dir.resolve()), f"+{GROUP}={keys}",
                f"hydra.sweep.dir={runs_dir.resolve()}", *self.hydra_args]  # fmt: skip

    def run(self, jobs: list[Job], runs_dir: Path, done: Callable[[Job], None]) -> None:
        for job in jobs:
            write_job(job, self.jobs_dir)
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"launch-{len(list(self.logs.glob('launch-*.log'))) + 1:04d}.log"
        waiting = {job.key: job for job in jobs}

        def collect() -> None:
            for key, job in list(waiting.items()):
                if read_run(runs_dir / key, job.steps).status != "pending":
                    done(waiting.pop(key))

        with open(log, "w") as out:
            proc = subprocess.Popen(self.command(jobs, runs_dir), stdout=out, stderr=subprocess.STDOUT,
                                    cwd=TRAIN.parent)  # fmt: skip
            try:
                while proc.poll() is None:
                    time.sleep(self.poll_s)
                    collect()
            except BaseException:  # Ctrl-C or SIGTERM: the runs checkpoint and stop, and a re-run resumes them
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=120)
                raise
        collect()
        finish(waiting, runs_dir, log, proc.returncode, done)


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
