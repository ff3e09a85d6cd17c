"""Metrics sinks: `metrics.jsonl` in the run directory (always) and Weights & Biases (same keys)."""

from __future__ import annotations

import hashlib
import json
import logging
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from trainer.config import WandbConfig, WandbMode
from trainer.errors import ConfigError

log = logging.getLogger(__name__)


def wandb_logged_in() -> bool:
    """Whether W&B credentials exist locally (no network call)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: WandbMode) -> str:
    """auto: WANDB_MODE if set, else online when logged in and offline otherwise (`wandb sync` later)."""
    if mode != WandbMode.auto:
        return mode.value
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if wandb_logged_in() else "offline"


class MetricsLogger:
    """One JSON object per logged step in metrics.jsonl, mirrored to W&B."""

    def __init__(self, run_dir: Path, wandb_cfg: WandbConfig, config: dict, resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None:
            self._truncate_after(resume_step)
        self.file = open(self.path, "a", buffering=1)
        self.wandb = None
        self.wandb_mode = resolve_wandb_mode(wandb_cfg.mode)
        if self.wandb_mode != "disabled":
            self.wandb = self._start_wandb(run_dir, wandb_cfg, config)

    def _truncate_after(self, step: int) -> None:
        """A resumed run re-does the steps after its checkpoint: drop their old records. A line that is not a
        record (half a line, left by a kill during a write) is dropped with a warning."""
        if not self.path.exists():
            return
        keep, torn = [], 0
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                torn += 1
        if torn:
            log.warning("%s: dropped %d line(s) that are not whole records (a write cut short)", self.path, torn)
        tmp = self.path.with_name(self.path.name + ".tmp")  # a kill during the rewrite keeps the old file
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def _start_wandb(self, run_dir: Path, cfg: WandbConfig, config: dict):
        import wandb

        # A stable id per run directory, so a resumed run continues the same W&B run.
        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]
        try:
            return wandb.init(
                project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name, group=cfg.group,
                tags=list(cfg.tags), config=config, dir=str(run_dir), mode=self.wandb_mode, id=run_id,
                resume="allow",
            )  # fmt: skip
        except Exception as e:  # W&B trouble must not cost the run: metrics.jsonl still has everything
            log.warning("W&B could not start (%s: %s); logging to metrics.jsonl only", type(e).__name__, e)
            return None

    def log(self, step: int, record: dict) -> None:
        try:
            self.file.write(json.dumps({"step": step, **record}) + "\n")
        except OSError as e:  # a full disk, most often: one line (a torn last line is dropped on resume)
            raise ConfigError(
                f"{self.path} cannot be written at step {step} ({e.strerror or e}): free some space, then resume "
                f"with trainer.resume=auto (the checkpoints are intact)"
            ) from None
        if self.wandb is not None:  # lists (e.g. update ratios across layers) become W&B histograms
            import wandb

            self.wandb.log({k: wandb.Histogram(v) if isinstance(v, list) else v for k, v in record.items()}, step=step)

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # the write that failed has said so; a full disk cannot take the rest of the line either
            pass
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as e:  # e.g. a full disk under its offline files: the run's own error comes first
                log.warning("W&B could not finish (%s: %s); metrics.jsonl has every record", type(e).__name__, e)
            self.wandb = None


class NullMetrics:
    """What ranks other than 0 log to: nothing."""

    def log(self, step: int, record: dict) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def close(self) -> None:
        pass
