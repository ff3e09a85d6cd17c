"""Which checkpoints a run directory holds, and whether each one is whole.

A checkpoint directory (`checkpoints/step_XXXXXXXX/`, layout in trainer/checkpoint.py) ends with
`manifest.json`, written last: every other file with its size and SHA-256. It is *complete* when every file
is there at its size (`is_complete`: cheap, so listing reads no data) and *undamaged* when every file's
contents still match their checksum (`damage`: reads the files once, before they are loaded). A checkpoint
written before manifests counts as complete when it has state.pt and weights; one written before checksums
(format 1 manifests give sizes only) is checked by size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

from trainer.errors import ConfigError

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8})$")
SHARDED = "sharded"  # the torch.distributed.checkpoint directory inside a checkpoint

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, step: int) -> None:
    """Every file of the checkpoint with its size and SHA-256 (about 1.5 GB/s: a second for GPT-2 124M's weights and
    AdamW state), so that a file damaged after it was written is found before it is loaded."""
    found = [p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST]
    files = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in found}
    (directory / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))


def _manifest_files(ckpt: Path) -> dict[str, dict]:
    """{file: {"bytes": n, "sha256": h}} (manifests of format 1 before checksums give the size alone)."""
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    return {name: entry if isinstance(entry, dict) else {"bytes": entry} for name, entry in files.items()}


def aside_name(final: Path) -> Path:
    n, aside = 1, final.with_name(f"{final.name}.replaced")
    while aside.exists():
        n += 1
        aside = final.with_name(f"{final.name}.replaced-{n}")
    return aside


def is_complete(ckpt: Path) -> str | None:
    """None if the checkpoint is complete (every file its manifest lists, at its size: cheap, so listing
    checkpoints reads no data); otherwise what is wrong with it, for a message. `damage` checks the contents."""
    manifest = ckpt / MANIFEST
    if not manifest.exists():  # written before manifests: state and weights present
        if not (ckpt / "state.pt").exists():
            return "no state.pt"
        return None if has_whole_weights(ckpt) or is_sharded(ckpt) else "no weights"
    try:
        files = _manifest_files(ckpt)
        for name, entry in files.items():
            path = ckpt / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != entry["bytes"]:
                return f"{name} has {path.stat().st_size} bytes, its manifest says {entry['bytes']}"
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        return f"{MANIFEST} is unreadable"
    return None


def damage(ckpt: Path) -> str | None:
    """None if every file's contents match the checksum its manifest recorded; otherwise the first that does not
    (a bit flip, a hand edit, a copy cut short and padded). Reads the whole checkpoint once."""
    why = is_complete(ckpt)
    if why is not None or not (ckpt / MANIFEST).exists():
        return why
    for name, entry in _manifest_files(ckpt).items():
        if "sha256" in entry:
            try:
                if _sha256(ckpt / name) != entry["sha256"]:
                    return f"{name} does not match its checksum: it changed after it was written"
            except OSError as e:
                return f"{name} cannot be read ({type(e).__name__}: {e})"
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


def find_checkpoint(given: str, what: str = "trainer.resume") -> Path:
    """A checkpoint named on a command line: that checkpoint directory (it must be complete), or the newest
    complete one in that run directory (or its checkpoints/ directory). ConfigError if there is none."""
    path = Path(given).expanduser()
    if STEP_DIR.match(path.name) and path.is_dir():
        why = is_complete(path)
        if why is not None:
            raise ConfigError(f"{what}={given!r} is incomplete ({why}): name an earlier checkpoint, or its run")
        return path
    if (path / "state.pt").exists():
        return path
    for root in (path / "checkpoints", path):
        ckpts = list_checkpoints(root)
        if ckpts:
            return ckpts[-1]
    raise ConfigError(f"{what}={given!r}: no checkpoint there; give a checkpoint or run directory")
