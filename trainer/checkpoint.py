"""Checkpoints: written atomically, read only from files we wrote.

Layout of `<run_dir>/checkpoints/step_00000500/`:
  model.safetensors   the weights (tied tensors stored once)              single process and DDP
  sharded/            model and optimizer shards, one file per rank       FSDP
                      (torch.distributed.checkpoint: reloads at any world size)
  state.pt            the state of each stateful component (scheduler, grad scaler, sampler, anomaly
                      guard, RNG), the progress record (step, loss window, train seconds), the
                      optimizer state when not sharded, and what resuming checks (format, model
                      shape, tokenizer): tensors and plain Python values only, so
                      `torch.load(weights_only=True)` reads it
  config.yaml         the resolved run config
  tokenizer/          the tokenizer the run was trained with
  manifest.json       written last: every file above with its size. A checkpoint is complete only if
                      its manifest says so (one written before manifests existed counts as complete
                      when it has state.pt and its weights)

Each checkpoint is written into a temporary sibling directory (every rank writes its shards there)
that rank 0 renames into place only when all of it is on disk, so a kill in the middle of a write
leaves the previous checkpoint as the latest one. Under several nodes the run directory must be on a
shared filesystem.

This module owns checkpoint state: `save` writes the model, the optimizer and a mapping of Stateful
components, `restore` loads them back, and `load_state` reads the format number and refuses others.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model

from models.minigpt import GPTConfig, MiniGPT
from trainer.distributed import Dist, barrier, broadcast
from trainer.errors import ConfigError
from trainer.runtime import rng_state, set_rng_state

log = logging.getLogger(__name__)

STATE_FORMAT = 1  # state.pt's "format"; load_state refuses any other
STEP_DIR = re.compile(r"^step_(\d{8})$")
SHARDED = "sharded"  # the torch.distributed.checkpoint directory inside a checkpoint
PROGRESS = "progress"  # the component whose keys sit at the top level of state.pt (format 1's layout)


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Progress:
    """Where the loop stands: optimizer steps done, the train losses since the last log step (sum, count)
    and the wall time spent in training steps (evaluation and checkpoints excluded)."""

    step: int = 0
    loss_window: tuple[float, int] = (0.0, 0)
    train_seconds: float = 0.0
    resumed_from: Path | None = None  # the checkpoint it was loaded from (not saved)

    def state_dict(self) -> dict:
        return {"step": self.step, "loss_window": list(self.loss_window), "train_seconds": self.train_seconds}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.loss_window = state["step"], tuple(state["loss_window"])
        self.train_seconds = state["train_seconds"]


class RNG:
    """The torch (and CUDA) generators: dropout and anything else drawn outside the sampler."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict:
        return rng_state(self.device)

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state, self.device)


def optimizer_format(d: Dist) -> str:
    """How a checkpoint stores model and optimizer state: sharded by torch.distributed.checkpoint
    (FSDP), or whole (model.safetensors and torch's own `optimizer.state_dict()`)."""
    return "dcp" if d.strategy == "fsdp" else "torch"


def save(
    ckpt_root: Path, step: int, model: MiniGPT, optimizer: torch.optim.Optimizer,
    components: Mapping[str, Stateful], tokenizer, config_yaml: str, d: Dist, keep: int,
) -> Path:  # fmt: skip
    """Checkpoint `step` (every rank calls this): under FSDP each rank writes its shards of the model and the
    optimizer, otherwise rank 0 writes the whole model, which every rank holds, with the optimizer in state.pt."""
    sharded = d.strategy == "fsdp"

    def write(directory: Path) -> None:
        if sharded:
            save_sharded(directory, model, optimizer)
        if d.is_main:
            state = {
                "format": STATE_FORMAT, "optimizer_format": optimizer_format(d),
                "optimizer": None if sharded else optimizer.state_dict(),
                "model_config": vars(model.config).copy(), "tokenizer": tokenizer.identity,
            }  # fmt: skip
            for name, component in components.items():
                if name == PROGRESS:
                    state.update(component.state_dict())
                else:
                    state[name] = component.state_dict()
            write_files(directory, None if sharded else model, state, config_yaml, tokenizer)

    return save_checkpoint(ckpt_root, step, write, d, keep)


def restore(
    ckpt: Path, state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    components: Mapping[str, Stateful],
) -> None:  # fmt: skip
    """Load a checkpoint into a built run: the optimizer (and, when sharded, the weights, resliced to this
    run's ranks), then each component. Whole weights are loaded before wrapping (`load_weights`)."""
    if state["optimizer_format"] == "dcp":
        load_sharded(ckpt, model, optimizer)
    else:
        optimizer.load_state_dict(state["optimizer"])
    for name, component in components.items():
        try:
            component.load_state_dict(state if name == PROGRESS else state[name])
        except KeyError as e:
            raise ConfigError(f"checkpoint {ckpt} has no {e.args[0]!r} state: it is damaged; resume another") from None
        except ValueError as e:
            raise ConfigError(f"checkpoint {ckpt}: {e}") from None


def check_resumable(state: dict, d: Dist, ckpt: Path) -> None:
    """A sharded checkpoint resumes under any strategy; a whole one holds optimizer state keyed by
    position, which FSDP's sharded optimizer cannot take."""
    saved = state.get("optimizer_format")
    if saved not in ("dcp", "torch"):
        raise ConfigError(f"checkpoint {ckpt} has an older layout ({saved}): start a new run")
    if saved == "torch" and d.strategy == "fsdp":
        raise ConfigError(
            f"checkpoint {ckpt} was saved without FSDP (whole model and optimizer state): resume it with "
            f"distributed=ddp or distributed=none"
        )


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


def save_checkpoint(ckpt_root: Path, step: int, write: Callable[[Path], None], d: Dist, keep: int) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep`. Every rank calls this;
    `write(tmp)` fills the temporary directory (on every rank, so that each can write its shards)."""
    final = ckpt_root / f"step_{step:08d}"
    tmp = None
    if d.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp_step_{step:08d}_", dir=ckpt_root)
    tmp = Path(broadcast(tmp, d))
    try:
        write(tmp)
        barrier(d)  # every rank's shards are written
        if d.is_main:
            _write_manifest(tmp, step)
            _fsync_tree(tmp)
            if final.exists():  # incomplete, or from before a resume from an older checkpoint: keep it aside
                aside, why = _aside(final), is_complete(final)
                os.replace(final, aside)
                log.warning("%s existed (%s): moved to %s", final, f"incomplete: {why}" if why else "complete",
                            aside.name)  # fmt: skip
            os.replace(tmp, final)  # the commit point
            _fsync_dir(ckpt_root)
            for old in list_checkpoints(ckpt_root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(d)  # no rank goes on (or reads the checkpoint) before it is committed
    return final


def write_files(directory: Path, model: torch.nn.Module | None, state: dict, config_yaml: str, tokenizer) -> None:
    """What rank 0 writes into a checkpoint: the weights (unless sharded), state, config, tokenizer."""
    if model is not None:
        save_model(model, str(directory / "model.safetensors"))
    torch.save(state, directory / "state.pt")
    (directory / "config.yaml").write_text(config_yaml)
    tokenizer.save(directory / "tokenizer")


def _dcp_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """The state dicts torch.distributed.checkpoint reads and writes in place (sharded under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its own shards of the model and optimizer (a collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_dcp_state(model, optimizer), checkpoint_id=directory / SHARDED)


def load_sharded(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a sharded checkpoint into a model (and optimizer) sharded any way, or not at all: the saved
    shards are resliced to this run's world size. Without a process group it reads everything."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from trainer.dcp_reader import SafeLoadPlanner, SafeReader, read_metadata

    read_metadata(ckpt / SHARDED / ".metadata")  # a crafted file is refused here, in one line, before DCP reads it
    state = _dcp_state(model, optimizer)
    try:  # no pickle in the shards runs code (trainer/dcp_reader.py)
        dcp.load(state, storage_reader=SafeReader(ckpt / SHARDED), planner=SafeLoadPlanner())
    except ConfigError:
        raise
    except (Exception, CheckpointException) as e:  # DCP wraps each rank's error (a BaseException)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        cause = next((line for line in reversed(lines) if "Error" in line or "global" in line), lines[0])
        raise ConfigError(
            f"checkpoint {ckpt}: its shards could not be read safely ({cause[:300]}): not loaded, nothing from "
            f"them was run; resume or export another checkpoint"
        ) from None
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


MANIFEST = "manifest.json"


def _write_manifest(directory: Path, step: int) -> None:
    found = [p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST]
    files = {str(p.relative_to(directory)): p.stat().st_size for p in found}
    (directory / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))


def _aside(final: Path) -> Path:
    n, aside = 1, final.with_name(f"{final.name}.replaced")
    while aside.exists():
        n += 1
        aside = final.with_name(f"{final.name}.replaced-{n}")
    return aside


def is_complete(ckpt: Path) -> str | None:
    """None if the checkpoint is complete; otherwise what is wrong with it, for a message."""
    manifest = ckpt / MANIFEST
    if not manifest.exists():  # written before manifests: state and weights present
        if not (ckpt / "state.pt").exists():
            return "no state.pt"
        return None if has_whole_weights(ckpt) or is_sharded(ckpt) else "no weights"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError, OSError):
        return f"{MANIFEST} is unreadable"
    for name, size in files.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, its manifest says {size}"
    return None


def has_whole_weights(ckpt: Path) -> bool:
    return (ckpt / "model.safetensors").exists()


def is_sharded(ckpt: Path) -> bool:
    return (ckpt / SHARDED / ".metadata").exists()


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are never listed)."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(p for p in found if is_complete(p) is None)


def newer_incomplete(ckpt_root: Path, than: Path | None) -> list[tuple[Path, str]]:
    """Step directories newer than `than` (all, if None) that are not complete, with what is wrong."""
    if not ckpt_root.is_dir():
        return []
    found = sorted(p for p in ckpt_root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))
    bad = [(p, is_complete(p)) for p in found if than is None or p.name > than.name]
    return [(p, why) for p, why in bad if why is not None]


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
        latest = ckpts[-1] if ckpts else None
        for bad, why in newer_incomplete(run_dir / "checkpoints", latest):
            log.warning("trainer.resume=auto: skipping %s (%s); continuing from %s", bad, why, latest or "step 0")
        return latest
    path = Path(resume).expanduser()
    if STEP_DIR.match(path.name) and path.is_dir():
        why = is_complete(path)
        if why is not None:
            raise ConfigError(f"{what}={resume!r} is incomplete ({why}): name an earlier checkpoint, or its run")
        return path
    if (path / "state.pt").exists():
        return path
    for root in (path / "checkpoints", path):
        ckpts = list_checkpoints(root)
        if ckpts:
            return ckpts[-1]
    raise ConfigError(f"{what}={resume!r}: no checkpoint there; give a checkpoint or run directory")


def load_state(ckpt: Path) -> dict:
    """state.pt (tensors and plain containers only: weights_only), refused in one line if its format is
    not the one this code writes."""
    try:
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # torn or garbled
        raise ConfigError(f"checkpoint {ckpt}: state.pt cannot be read ({_first_line(e)}): {_DAMAGED}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        state = state if isinstance(state, dict) else {}
        raise ConfigError(
            f"checkpoint {ckpt} has state format {state.get('format')}; this trainer reads format {STATE_FORMAT}: "
            "resume it with the version that wrote it, or start a new run"
        )
    return state


_DAMAGED = "the checkpoint is damaged; resume or export an earlier one (the run keeps the previous checkpoints)"


def _first_line(e: BaseException) -> str:
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def load_model(ckpt: Path) -> MiniGPT:
    """The checkpoint's model (whole or sharded weights), on the CPU, in eval mode: what export,
    sample and the loss landscape read."""
    model = MiniGPT(GPTConfig(**load_state(ckpt)["model_config"]))
    load_weights(model, ckpt)
    return model.eval()


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """The weights of either kind of checkpoint into a plain (unwrapped) model."""
    if has_whole_weights(ckpt):
        try:
            load_safetensors(model, str(ckpt / "model.safetensors"))
        except (OSError, RuntimeError, ValueError, SafetensorError) as e:  # torn, garbled, or another shape
            why = _first_line(e)
            raise ConfigError(f"checkpoint {ckpt}: model.safetensors cannot be read ({why}): {_DAMAGED}") from None
    else:
        load_sharded(ckpt, model)


def check_compatible(state: dict, model_config: dict, tokenizer_identity: str, ckpt: Path) -> None:
    """Refuse to resume into a model of another shape or with another vocabulary."""
    if state["tokenizer"] != tokenizer_identity:
        raise ConfigError(
            f"checkpoint {ckpt} was trained with another vocabulary (tokenizer {state['tokenizer']}, "
            f"config gives {tokenizer_identity}): resume with the same tokenizer and data, or start a new run"
        )
    saved = {**asdict(GPTConfig()), **state["model_config"]}  # a field added since it was saved: its default
    diffs = [f"model.{k}={saved.get(k)} there, {v} here" for k, v in model_config.items() if saved.get(k) != v]
    if diffs:
        raise ConfigError(
            f"checkpoint {ckpt} has another model shape ({'; '.join(diffs)}): resume with the same "
            f"model settings, or start a new run (trainer.resume=null or a new hydra.run.dir)"
        )
