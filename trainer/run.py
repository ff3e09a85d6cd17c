"""One training run from a composed Hydra config: validate, build, fit, sample, report.

Bad input surfaces as ConfigError anywhere before the first step and is reported as one line.
"""

from __future__ import annotations

import logging
import shutil
import signal
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm.contrib.logging import logging_redirect_tqdm

from trainer.config import TrainConfig, to_typed
from trainer.errors import ConfigError

log = logging.getLogger("trainer")


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def run(cfg: DictConfig, run_dir: Path) -> float | None:
    """Train; return the final validation loss (what sweepers minimise)."""
    try:
        typed: TrainConfig = to_typed(cfg)
    except ConfigError as e:
        fail(str(e))
    except OmegaConfBaseException as e:
        fail(str(e).splitlines()[0])
    # Heavy imports after validation, so bad input is reported at once.
    from trainer import distributed
    from trainer.runtime import pick_device

    try:
        dc = typed.distributed
        d = distributed.setup(dc.strategy, dc.backend, dc.timeout_s, pick_device(typed.trainer.device))
    except ConfigError as e:
        fail(str(e))
    try:
        return _train(cfg, typed, run_dir, d)
    except ConfigError as e:
        fail(str(e) if not d.enabled else f"(rank {d.rank}) {e}")
    except Exception as e:  # under several processes, say which one failed; the launcher stops the rest
        if d.enabled:
            log.error("rank %d failed: %s: %s", d.rank, type(e).__name__, e)
        raise
    finally:
        distributed.teardown(d)


def _train(cfg: DictConfig, typed: TrainConfig, run_dir: Path, d) -> float | None:
    from trainer import distributed
    from trainer.build import setup_run
    from trainer.loop import fit, generate_text, optimizer_eval_mode
    from trainer.metrics import MetricsLogger, NullMetrics

    if d.enabled:  # every rank works in rank 0's run directory (Hydra's timestamps may differ by a second)
        own, run_dir = run_dir, Path(distributed.broadcast(str(run_dir), d))
        if own != run_dir and not d.is_main:
            shutil.rmtree(own, ignore_errors=True)
        if not d.is_main:
            logging.getLogger().setLevel(logging.WARNING)  # the console and train.log are rank 0's
    run_dir.mkdir(parents=True, exist_ok=True)
    r = setup_run(typed, run_dir, d)
    config_dict = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if d.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        metrics = MetricsLogger(run_dir, typed.logger.wandb, config_dict, r.start_step if r.resumed_from else None)
    else:
        metrics = NullMetrics()
    try:
        with logging_redirect_tqdm():
            result = fit(r, metrics)
        if result.interrupted_by is not None:
            name = signal.Signals(result.interrupted_by).name
            log.info(
                "%s at step %d: checkpoint saved; continue with trainer.resume=auto hydra.run.dir=%s",
                name,
                result.step,
                run_dir,
            )
            sys.exit(128 + result.interrupted_by)  # `finally` closes the metrics
        t = typed.trainer
        if t.sample_tokens > 0 and d.is_main:
            with optimizer_eval_mode(r.optimizer):  # schedule-free: sample at the averaged weights
                text = generate_text(
                    r.model, r.tokenizer, t.sample_prompt, t.sample_tokens, t.sample_temperature, t.sample_top_k, t.seed
                )
            (run_dir / "sample.txt").write_text(text)
            log.info("sample (sample.txt):\n%s", text)
        if result.val_loss is not None:
            metrics.summary({"final/val_loss": result.val_loss})
            log.info("done: step %d, val loss %.4f; run directory %s", result.step, result.val_loss, run_dir)
        return result.val_loss
    finally:
        metrics.close()
