"""One training run from a composed Hydra config: validate, build, fit, sample, report.

Bad input surfaces as ConfigError anywhere before the first step and is reported as one line.
"""

from __future__ import annotations

import logging
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
    from trainer.build import setup_run
    from trainer.loop import fit, generate_text, optimizer_eval_mode
    from trainer.metrics import MetricsLogger

    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        r = setup_run(typed, run_dir)
    except ConfigError as e:
        fail(str(e))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    config_dict = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    metrics = MetricsLogger(run_dir, typed.logger.wandb, config_dict, r.start_step if r.resumed_from else None)
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
        if t.sample_tokens > 0:
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
