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
  manifest.json       written last: every file above with its size and SHA-256. A checkpoint is complete
                      only if its manifest says so, and is loaded only if every checksum matches
                      (trainer/checkpoint_files.py: listing, completeness, damage)

Each checkpoint is written into a temporary sibling directory (every rank writes its shards there)
that rank 0 renames into place only when all of it is on disk, so a kill in the middle of a write
leaves the previous checkpoint as the latest one. Under several nodes the run directory must be on a
shared filesystem.

This module owns checkpoint state: `save` writes the model, the optimizer and a mapping of Stateful
components, `restore` loads them back, and `load_state` reads the format number and refuses others.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model

from models.minigpt import GPTConfig, MiniGPT
from trainer.checkpoint_files import (  # noqa: F401  (re-exported: what a run directory holds)
    MANIFEST,
    SHARDED,
    STEP_DIR,
    aside_name,
    damage,
    find_checkpoint,
    has_whole_weights,
    is_complete,
    is_sharded,
    list_checkpoints,
    newer_incomplete,
    remove_stale_temporaries,
    write_manifest,
)
from trainer.distributed import Dist, barrier, broadcast
from trainer.errors import ConfigError, filesystem_fault
from trainer.runtime import rng_state, set_rng_state

log = logging.getLogger(__name__)

STATE_FORMAT = 1  # state.pt's "format"; load_state refuses any other
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
    `write(tmp)` fills the temporary directory (on every rank, so that each can write its shards). A write
    that fails (a full disk, a read-only directory) removes what it wrote, leaves the previous checkpoints
    as they were, and raises ConfigError: one line naming the directory and the cause."""
    final = ckpt_root / f"step_{step:08d}"
    tmp = None
    try:
        if d.is_main:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".tmp_step_{step:08d}_", dir=ckpt_root)
        tmp = Path(broadcast(tmp, d))
        write(tmp)
        barrier(d)  # every rank's shards are written
        if d.is_main:
            write_manifest(tmp, step)
            _fsync_tree(tmp)
            if final.exists():  # incomplete, or one this run did not resume from (damaged, or newer): keep it aside
                aside, why = aside_name(final), is_complete(final)
                os.replace(final, aside)
                log.warning("%s existed (%s): moved to %s", final, f"incomplete: {why}" if why else
                            "a checkpoint this run did not resume from", aside.name)  # fmt: skip
            os.replace(tmp, final)  # the commit point
            _fsync_dir(ckpt_root)
            for old in list_checkpoints(ckpt_root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        why = _write_failure(e, ckpt_root)  # before the clean-up frees the space
        if d.is_main and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if why is None:
            raise
        kept = list_checkpoints(ckpt_root)
        previous = f"the previous checkpoint {kept[-1].name} is intact" if kept else "no earlier checkpoint exists"
        raise ConfigError(f"checkpoint of step {step} could not be written in {ckpt_root}: {why}; {previous}") from None
    barrier(d)  # no rank goes on (or reads the checkpoint) before it is committed
    return final


# What torch's zip writer says when a write fails: it never mentions the cause (issue 14: "unexpected pos").
# What torch's zip writer says when a write fails: it never names the cause (issue 14: "unexpected pos").
_TORCH_WRITER = ("unexpected pos", "iostream error", "file write failed", "PytorchStreamWriter")


def _write_failure(e: BaseException, ckpt_root: Path) -> str | None:
    """Why a checkpoint write failed, for one line, when the cause is the filesystem (None otherwise: a bug
    keeps its traceback). torch.save's own error names no cause, so a nearly full disk is looked up."""
    chain, x = [], e
    while x is not None and len(chain) < 8:
        chain.append(x)
        x = x.__cause__ or x.__context__
    for x in chain:
        if (why := filesystem_fault(x)) is not None:
            return why
    text = " ".join(str(x) for x in chain)
    try:
        usage = shutil.disk_usage(ckpt_root if ckpt_root.exists() else ckpt_root.parent)
        free, nearly_full = f"{usage.free / 2**20:.1f} MiB free", usage.free < max(16 * 2**20, usage.total // 100)
    except OSError:
        free, nearly_full = "free space unknown", False
    full = "No space left" in text or (nearly_full and any(marker in text for marker in _TORCH_WRITER))
    if full:  # safetensors and torch.save wrap the OSError in their own exceptions
        return filesystem_fault(OSError(errno.ENOSPC, f"No space left on device ({free})"))
    if any(marker in text for marker in (*_TORCH_WRITER, "I/O error", "os error")):
        return f"a write failed ({_first_line(chain[-1])}; {free})"
    return None


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


class DamagedCheckpoint(ConfigError):
    """A checkpoint whose files do not read back as written: `why` names the file and the cause."""

    def __init__(self, ckpt: Path, why: str):
        self.ckpt, self.why = ckpt, why
        super().__init__(f"checkpoint {ckpt}: {why}: {_DAMAGED}")


_DAMAGED = "the checkpoint is damaged; resume or export an earlier one (the run keeps the previous checkpoints)"


def _first_line(e: BaseException) -> str:
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def load_state(ckpt: Path) -> dict:
    """state.pt (tensors and plain containers only: weights_only), refused in one line if its format is
    not the one this code writes."""
    try:
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # torn or garbled
        raise DamagedCheckpoint(ckpt, f"state.pt cannot be read ({_first_line(e)})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        state = state if isinstance(state, dict) else {}
        raise ConfigError(
            f"checkpoint {ckpt} has state format {state.get('format')}; this trainer reads format {STATE_FORMAT}: "
            "resume it with the version that wrote it, or start a new run"
        )
    return state


def read_checkpoint(ckpt: Path) -> dict:
    """The state of a checkpoint whose files read back as written: every checksum matches, a sharded
    checkpoint's metadata unpickles safely, state.pt loads. DamagedCheckpoint otherwise, naming the file."""
    why = damage(ckpt)
    if why is not None:
        raise DamagedCheckpoint(ckpt, why)
    if has_whole_weights(ckpt):  # the header, for checkpoints written before checksums (cheap: no tensor data)
        try:
            with safe_open(ckpt / "model.safetensors", framework="pt") as f:
                f.keys()
        except (OSError, SafetensorError) as e:
            raise DamagedCheckpoint(ckpt, f"model.safetensors cannot be read ({_first_line(e)})") from None
    if is_sharded(ckpt):
        from trainer.dcp_reader import read_metadata

        read_metadata(ckpt / SHARDED / ".metadata")  # a crafted pickle is refused here, in one line
    return load_state(ckpt)


def choose_resume(resume: str | None, run_dir: Path, d: Dist) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from, and its state. Under `auto`, the newest one that reads back whole: a
    damaged or incomplete one is skipped with a warning that names it (it is moved aside when its step is
    written again). If the run directory has checkpoints and none can be read, the run stops in one line
    rather than start again from step 0. Rank 0 reads and chooses; every rank gets its choice."""
    if d.is_main:
        try:
            ckpt, state = _choose(resume, run_dir)
            outcome = (str(ckpt) if ckpt else None, None)
        except ConfigError as e:
            ckpt, state, outcome = None, None, (None, str(e))
    path, error = broadcast(outcome if d.is_main else None, d)
    if error is not None:
        raise ConfigError(error)
    if path is None:
        return None, None
    return Path(path), state if d.is_main else load_state(Path(path))


def _choose(resume: str | None, run_dir: Path) -> tuple[Path | None, dict | None]:
    if resume is None:
        return None, None
    if resume != "auto":
        ckpt = find_checkpoint(resume)
        return ckpt, read_checkpoint(ckpt)
    root = run_dir / "checkpoints"
    skipped = [(p, why) for p, why in newer_incomplete(root, None)]
    for ckpt in reversed(list_checkpoints(root)):
        try:
            state = read_checkpoint(ckpt)
        except DamagedCheckpoint as e:
            skipped.append((ckpt, e.why))
            continue
        for bad, why in skipped:
            log.warning("trainer.resume=auto: skipping %s (%s); continuing from %s", bad, why, ckpt.name)
        return ckpt, state
    if skipped:
        listed = "; ".join(f"{p.name}: {why}" for p, why in sorted(skipped))
        raise ConfigError(
            f"trainer.resume=auto: no checkpoint in {root} can be read ({listed}): move them aside to train again "
            f"from step 0, or pass trainer.start_over=true"
        )
    return None, None


def load_model(ckpt: Path) -> MiniGPT:
    """The checkpoint's model (whole or sharded weights), on the CPU, in eval mode: what export,
    sample and the loss landscape read. Every file is checked against its checksum first."""
    model = MiniGPT(GPTConfig(**read_checkpoint(ckpt)["model_config"]))
    load_weights(model, ckpt)
    return model.eval()


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """The weights of either kind of checkpoint into a plain (unwrapped) model."""
    if has_whole_weights(ckpt):
        try:
            load_safetensors(model, str(ckpt / "model.safetensors"))
        except (OSError, RuntimeError, ValueError, SafetensorError) as e:  # torn, garbled, or another shape
            raise DamagedCheckpoint(ckpt, f"model.safetensors cannot be read ({_first_line(e)})") from None
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
