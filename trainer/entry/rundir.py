"""One run per run directory: a second launch into a used one is refused, unless it continues that run
(`trainer.resume=auto`) or asks to start over (`trainer.start_over=true`, which archives the old run)."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from trainer.errors import ConfigError

log = logging.getLogger(__name__)

# What a run writes into its directory (Hydra's .hydra/ and train.log are Hydra's, rewritten at each launch).
RUN_FILES = ("metrics.jsonl", "config.yaml", "checkpoints", "sample.txt", "wandb", "plots")


def holds_run(run_dir: Path) -> bool:
    return (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").is_dir()


def continues_itself(resume: str | None, run_dir: Path) -> bool:
    """Whether trainer.resume continues the run in run_dir (auto, or a path inside it)."""
    if resume is None:
        return False
    if resume == "auto":
        return True
    inside = Path(resume).expanduser().resolve()
    return inside == run_dir.resolve() or run_dir.resolve() in inside.parents


def check_run_dir(run_dir: Path, resume: str | None, start_over: bool) -> None:
    """Refuse, in one line, a launch that would mix a new run into the run already in run_dir."""
    if holds_run(run_dir) and not start_over and not continues_itself(resume, run_dir):
        raise ConfigError(
            f"{run_dir} already holds a run: pass trainer.resume=auto to continue it, a new hydra.run.dir, "
            f"or trainer.start_over=true to archive it and start again"
        )


def check_writable(path: Path) -> None:
    """Refuse, in one line and before any work, a directory that cannot be written (read-only, no permission):
    `path` itself if it exists, else the nearest directory above it, where it would be created."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, "not a directory", str(probe))
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        where = path if probe == path else f"{path} (in {probe})"
        raise ConfigError(
            f"{where} cannot be written ({e.strerror or e}): make it writable, or pass another hydra.run.dir"
        ) from None


LOCK = ".run.lock"


def hold_run_dir(run_dir: Path):
    """Take the run directory for this process (rank 0) until it exits, or refuse in one line if another process
    holds it: two launches at once (a job re-queued while the first still runs, a command run twice with
    trainer.resume=auto) would otherwise both pass check_run_dir and write the same files. The lock is
    flock(2): the kernel drops it when the holder dies, so a killed run leaves nothing stale. (On a shared
    filesystem it holds across nodes only where that filesystem supports flock.) Returns the open lock file,
    which the caller keeps for the run's lifetime."""
    f = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(
            f"{run_dir} is in use by {holder}: wait for it to finish (or stop it), or pass another hydra.run.dir"
        ) from None
    try:  # who holds it, for the refusal's line; on a full disk the lock holds without it
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
    except OSError:
        pass
    return f


def write_run_file(path: Path, text: str) -> None:
    """Write one of the run's small files; a write that fails names the file (Python's own error does not)."""
    try:
        path.write_text(text)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def archive_run(run_dir: Path) -> Path | None:
    """Move the old run's files into run_dir/replaced-<UTC time>/ (nothing is deleted); None if there was none."""
    present = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if not present:
        return None
    stamp = time.strftime("replaced-%Y%m%d-%H%M%S", time.gmtime())
    archive, n = run_dir / stamp, 1
    while archive.exists():  # two start-overs within a second
        n += 1
        archive = run_dir / f"{stamp}-{n}"
    archive.mkdir()
    for path in present:
        shutil.move(str(path), str(archive / path.name))
    log.warning("trainer.start_over=true: the run that was in %s is now in %s", run_dir, archive)
    return archive
