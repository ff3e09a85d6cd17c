"""Bad input: the one exception type, and the one way every entry point reports it (an `error:` line)."""

import errno
import os
import sys


class ConfigError(Exception):
    """Bad input: the message says what is wrong and how to fix it, in one line."""


class RunFailed(Exception):
    """A sweep's job that failed with a one-line reason: Hydra records it and goes on with the others."""


def exit_with_error(message: str, code: int = 2):
    """Print `error: message` on stderr and exit with `code`. Inside a Hydra sweep's job (-m), raise
    RunFailed instead, so that the sweep's other jobs still run."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    if _in_sweep():
        raise RunFailed(message)
    sys.exit(code)


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def hub_unreachable() -> str:
    """Why the Hugging Face hub gave nothing, for an error line: offline by setting, or not reachable."""
    offline = any(os.environ.get(v) for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return "the hub is offline (HF_HUB_OFFLINE is set)" if offline else "the hub could not be reached"


def filesystem_fault(e: BaseException) -> str | None:
    """What a filesystem fault (a full disk, a read-only or forbidden directory) means for the user, in one line
    naming the file; None for any other error, which keeps its traceback."""
    if not isinstance(e, OSError) or e.errno not in _FAULTS:
        return None
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror}: {_FAULTS[e.errno]}"


_RESUME = "then resume with trainer.resume=auto"
_FAULTS = {
    errno.ENOSPC: f"the disk is full; free some space (or lower trainer.keep_checkpoints), {_RESUME}",
    errno.EDQUOT: f"the disk quota is used up; free some space, {_RESUME}",
    errno.EROFS: "make it writable, or pass another hydra.run.dir (or data.cache_dir)",
    errno.EACCES: "fix its permissions, or pass another hydra.run.dir (or data.cache_dir)",
    errno.EIO: "the disk reported an I/O error; check it, or move the run elsewhere",
}
