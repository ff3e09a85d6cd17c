"""Checkpoints: written atomically, read only from files we wrote.

Layout of `<run_dir>/checkpoints/step_00000500/`:
  model.safetensors   the weights (tied tensors stored once)
  state.pt            optimizer, scheduler, grad scaler, step, sampler and RNG states (tensors and
                      plain Python values only, so `torch.load(weights_only=True)` reads it)
  config.yaml         the resolved run config
  tokenizer/          the tokenizer the run was trained with

Each checkpoint is written into a temporary sibling directory that is renamed into place only when
complete, so a kill in the middle of a write leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from trainer.errors import ConfigError

STEP_DIR = re.compile(r"^step_(\d{8})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    """Flush file contents before the rename, so the renamed directory is never empty on disk."""
    for path in [*directory.rglob("*"), directory]:
        _fsync_dir(path)


def save_checkpoint(
    ckpt_root: Path, step: int, model: torch.nn.Module, state: dict, config_yaml: str, tokenizer, keep: int
) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep`."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    if final.exists():  # this exact step was already saved (e.g. the last step is also an interval step)
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp_step_{step:08d}_", dir=ckpt_root))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        tokenizer.save(tmp / "tokenizer")
        _fsync_tree(tmp)
        os.replace(tmp, final)  # the commit point
        _fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are never listed)."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(p for p in found if (p / "state.pt").exists() and (p / "model.safetensors").exists())


def remove_stale_temporaries(ckpt_root: Path) -> None:
    """Remove leftovers of writes that were killed part-way."""
    if ckpt_root.is_dir():
        for p in ckpt_root.glob(".tmp_step_*"):
            shutil.rmtree(p, ignore_errors=True)


def resolve_resume(resume: str | None, run_dir: Path, what: str = "trainer.resume") -> Path | None:
    """`null` -> None; `auto` -> the latest checkpoint in this run directory, if any;
    a path -> that checkpoint, or the latest one in that run (or checkpoints) directory."""
    if resume is None:
        return None
    if resume == "auto":
        ckpts = list_checkpoints(run_dir / "checkpoints")
        return ckpts[-1] if ckpts else None
    path = Path(resume).expanduser()
    if (path / "state.pt").exists():
        return path
    for root in (path / "checkpoints", path):
        ckpts = list_checkpoints(root)
        if ckpts:
            return ckpts[-1]
    raise ConfigError(f"{what}={resume!r}: no checkpoint there; give a checkpoint or run directory")


def load_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    load_model(model, str(ckpt / "model.safetensors"))


def check_compatible(state: dict, model_config: dict, tokenizer_identity: str, ckpt: Path) -> None:
    """Refuse to resume into a model of another shape or with another vocabulary."""
    if state["tokenizer"] != tokenizer_identity:
        raise ConfigError(
            f"checkpoint {ckpt} was trained with another vocabulary (tokenizer {state['tokenizer']}, "
            f"config gives {tokenizer_identity}): resume with the same tokenizer and data, or start a new run"
        )
    saved = state["model_config"]
    diffs = [f"model.{k}={saved.get(k)} there, {v} here" for k, v in model_config.items() if saved.get(k) != v]
    if diffs:
        raise ConfigError(
            f"checkpoint {ckpt} has another model shape ({'; '.join(diffs)}): resume with the same "
            f"model settings, or start a new run (trainer.resume=null or a new hydra.run.dir)"
        )
