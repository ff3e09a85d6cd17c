"""One-line errors for bad command lines.

Hydra reports a bad override over several lines (search paths, object types, a hint about a stack
trace). Before Hydra starts the run, `precheck` composes the same config with the same overrides and
validates it; any problem is printed as a single `error: ...` line and the process exits with 2, so
no run directory is created for a command line that cannot work.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.config import TrainConfig, register_configs, to_typed
from trainer.data.corpus import find_corpus
from trainer.entry.rundir import check_run_dir, check_writable
from trainer.errors import ConfigError, exit_with_error

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
_NOISE = ("Config search path", "provider=", "full_key:", "reference_type=", "object_type=", "To append")


def one_line(error: BaseException) -> str:
    """Hydra/OmegaConf's message (and its causes) without search paths and type dumps, on one line."""
    parts: list[str] = []
    for err in (error, error.__cause__):  # Hydra's summary, then OmegaConf's reason
        for raw in str(err or "").splitlines():
            line = raw.strip().rstrip(":.")
            if line and not line.startswith(_NOISE) and "$VALUE" not in line and line not in parts:
                parts.append(line)
    text = "; ".join(parts)
    return text.replace("; Available options in", " - available options in").replace("'; ", "': ", 1)


def compose_config(overrides: list[str]) -> TrainConfig:
    """The typed, validated config of `python train.py OVERRIDES` (raises on bad input): for scripts."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return to_typed(cfg)


def config_or_exit(overrides: list[str]) -> TrainConfig:
    """compose_config for a command line: any problem is printed as one `error:` line, exit 2."""
    try:
        typed = compose_config(overrides)
        if typed.data.kind == "text":
            find_corpus(typed.data)  # a missing data.path is reported before a run directory exists
        if typed.data.kind == "hf" and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            import datasets

            from trainer.data.hf import open_source

            datasets.logging.set_verbosity_error()  # its notes (a cached version used...) come with the run
            open_source(typed.data)  # an unknown dataset, split or column (not under torchrun: every rank would)
            datasets.logging.set_verbosity_warning()
        return typed
    except ConfigError as e:
        exit_with_error(str(e))
    except (HydraException, OmegaConfBaseException) as e:
        hint = "see `python train.py --help` for groups and options, `--cfg job` for every key"
        exit_with_error(f"{one_line(e)} ({hint})")


def scratch_run(overrides: list[str]):
    """The Run of `python train.py OVERRIDES`, built in a throw-away directory with no progress bar and no
    W&B: for the scripts that time or probe training steps (bench, bench_stats, lr_find). Bad input,
    in the overrides or found while building (a too-short corpus, say), exits with one line."""
    from trainer.build import setup_run

    cfg = config_or_exit([*overrides, "trainer.progress=false", "logger.wandb.mode=disabled"])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return setup_run(cfg, Path(tmp))
    except ConfigError as e:
        exit_with_error(str(e))


def precheck(argv: list[str]) -> None:
    """Compose and validate a single run's overrides; exit with one line on failure.

    Multirun sweeps (`-m`) and Hydra's own flags (`--cfg`, `--help`, ...) are left to Hydra.
    """
    if not any(arg.startswith("-") for arg in argv):
        typed = config_or_exit(argv)
        run_dir = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("hydra.run.dir=")), None)
        try:  # before Hydra writes into it (Hydra's default run directories are under runs/)
            check_writable(Path(run_dir or "runs"))
            if run_dir is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
                # (under torchrun the run checks it, once the ranks agree whether this is a restart)
                check_run_dir(Path(run_dir), typed.trainer.resume, typed.trainer.start_over)
        except ConfigError as e:
            exit_with_error(str(e))
