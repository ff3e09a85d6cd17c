"""One training run from a composed Hydra config: validate, build, fit, sample, report.

Bad input surfaces as ConfigError anywhere before the first step and is reported as one line.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from pathlib import Path

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from tqdm.contrib.logging import logging_redirect_tqdm

from trainer.config import TrainConfig, config_dict, config_yaml, to_typed
from trainer.entry.rundir import archive_run, check_run_dir, check_writable, hold_run_dir, write_run_file
from trainer.errors import ConfigError, exit_with_error, filesystem_fault

log = logging.getLogger("trainer")


# A collective that lost its peer (gloo, NCCL): the error is another rank's, reported by that rank.
PEER_LOST = ("closed by peer", "reset by peer", "remote worker", "remote process", "communicator was aborted")


def _first_line(e: Exception) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def elastic_restart(d) -> int:
    """How many times torchrun (--max-restarts) has restarted the workers; 0 on the first attempt. torchrun
    counts per node (a node restarted because another one failed does not count it): every rank takes the
    largest count, so that all of them make the same choice."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    if d.enabled:
        import torch.distributed as torch_dist

        counts = [0] * d.world_size
        torch_dist.all_gather_object(counts, restart)
        restart = max(counts)
    return restart


def restarts_share_the_store(env=os.environ) -> bool:
    """torchrun may restart the workers, and they join the process group through torchrun's own TCPStore,
    which keeps the failed attempt's addresses: restarted workers can then fail or hang in
    init_process_group (pytorch#135712). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun avoids it."""
    return int(env.get("TORCHELASTIC_MAX_RESTARTS") or 0) > 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def sweep_identity() -> tuple[str, str] | None:
    """(W&B group, run name) when Hydra runs this job as part of a sweep (-m): the sweep directory, and
    the job's own overrides (or its number); None for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hc = HydraConfig.get()
    return "-".join(Path(hc.sweep.dir).parts[-2:]), hc.job.override_dirname or f"job{hc.job.num}"


def run(cfg: DictConfig, run_dir: Path) -> float | None:
    """Train; return the final validation loss (what sweepers minimise)."""
    # A log line that cannot reach train.log (a full disk) is dropped, not printed with a traceback; the
    # write that matters (a checkpoint, metrics.jsonl) reports the fault in one line.
    logging.raiseExceptions = False
    try:
        typed: TrainConfig = to_typed(cfg)
    except ConfigError as e:
        exit_with_error(str(e))
    except OmegaConfBaseException as e:
        exit_with_error(str(e).splitlines()[0])
    # Heavy imports after validation, so bad input is reported at once.
    from trainer import distributed
    from trainer.runtime import pick_device

    try:
        dc = typed.distributed
        d = distributed.setup(dc.strategy, dc.backend, dc.timeout_s, pick_device(typed.trainer.device))
    except ConfigError as e:
        exit_with_error(str(e))
    try:
        return _train(typed, run_dir, d)
    except ConfigError as e:
        exit_with_error(str(e) if not d.enabled else f"(rank {d.rank}) {e}")
    except Exception as e:  # under several processes, say which one failed; the launcher stops the rest
        if (why := filesystem_fault(e)) is not None:  # a full disk or a read-only directory, whichever file met it
            exit_with_error(why if not d.enabled else f"(rank {d.rank}) {why}")
        if not d.enabled:
            raise
        if any(marker in str(e).lower() for marker in PEER_LOST):  # a peer failed first and said why
            log.error("rank %d stopped: another rank failed or exited (see its error): %s", d.rank, _first_line(e))
            sys.exit(1)  # this rank's traceback would only bury the real error
        log.error("rank %d failed: %s: %s", d.rank, type(e).__name__, e)
        raise
    finally:
        distributed.teardown(d)


def _train(typed: TrainConfig, run_dir: Path, d) -> float | None:
    from optim.builder import eval_mode
    from trainer import distributed
    from trainer.build import setup_run
    from trainer.loop import fit, generate_text
    from trainer.telemetry.metrics import MetricsLogger, NullMetrics

    if d.enabled:  # every rank works in rank 0's run directory (Hydra's timestamps may differ by a second)
        own, run_dir = run_dir, Path(distributed.broadcast(str(run_dir), d))
        if own != run_dir and not d.is_main:
            shutil.rmtree(own, ignore_errors=True)
        if not d.is_main:
            logging.getLogger().setLevel(logging.WARNING)  # the console and train.log are rank 0's
    if d.is_main:  # a read-only run or checkpoint directory fails here, not at the first checkpoint
        check_writable(run_dir)
        check_writable(run_dir / "checkpoints")
    run_dir.mkdir(parents=True, exist_ok=True)
    try:  # one process trains in a run directory at a time; every rank learns rank 0's answer
        lock, refused = (hold_run_dir(run_dir), None) if d.is_main else (None, None)
    except ConfigError as e:
        lock, refused = None, str(e)
    if (refused := distributed.broadcast(refused, d)) is not None:
        raise ConfigError(refused)
    if d.is_main and restarts_share_the_store():
        log.warning(
            "torchrun --max-restarts: launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, or restarted workers can "
            "fail or hang joining the process group (torchrun's shared store keeps the failed attempt's addresses)"
        )
    restart = elastic_restart(d)
    if restart:
        _continue_after_restart(typed, run_dir, restart, d.is_main)
    else:  # a restart continues its own run; any other launch must not mix into one
        check_run_dir(run_dir, typed.trainer.resume, typed.trainer.start_over)
        distributed.barrier(d)  # every rank has looked before rank 0 moves anything
        if typed.trainer.start_over and d.is_main:
            archive_run(run_dir)
        distributed.barrier(d)
    sweep = sweep_identity()
    if sweep is not None:  # runs of one sweep share a W&B group; each is named by its overrides
        w = typed.logger.wandb
        w.group, w.name = w.group or sweep[0], w.name or sweep[1]
    r = setup_run(typed, run_dir, d)
    if d.is_main:
        write_run_file(run_dir / "config.yaml", config_yaml(typed))  # what ran, sweep names included
        # A restart, or resume=auto, that found no checkpoint trains again from step 0: drop the old records.
        resume_step = r.progress.step if r.progress.resumed_from else (-1 if restart or typed.trainer.resume else None)
        metrics = MetricsLogger(run_dir, typed.logger.wandb, config_dict(typed), resume_step)
    else:
        metrics = NullMetrics()
    try:
        with logging_redirect_tqdm():
            result = fit(r, metrics)
        if result.anomaly is not None:  # checkpointed (the weights from before the bad step); say so and stop
            exit_with_error(
                f"stopped by trainer.anomaly: {result.anomaly}; the checkpoint of step {result.step} in {run_dir} "
                f"holds the weights from before it (resume with trainer.resume=auto, perhaps with a lower "
                f"optimizer.lr)",
                code=3,
            )
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
        # Under FSDP every rank samples: each forward all-gathers the shards, so every rank must take part.
        # Each draws the same tokens (the same weights, prompt and seed) and runs sample_tokens forwards.
        if t.sample_tokens > 0 and (d.is_main or d.strategy == "fsdp"):
            with eval_mode(r.optimizer, typed.optimizer):  # schedule-free: sample at the averaged weights
                text = generate_text(
                    r.model, r.tokenizer, t.sample_prompt, t.sample_tokens, t.sample_temperature, t.sample_top_k, t.seed
                )
            if d.is_main:
                write_run_file(run_dir / "sample.txt", text)
                log.info("sample (sample.txt):\n%s", text)
        if result.val_loss is not None:
            metrics.summary({"final/val_loss": result.val_loss})
            log.info("done: step %d, val loss %.4f; run directory %s", result.step, result.val_loss, run_dir)
        return result.val_loss
    finally:
        metrics.close()
        if lock is not None:  # the run directory is free again (an exit would free it too)
            lock.close()


def _continue_after_restart(typed: TrainConfig, run_dir: Path, restart: int, is_main: bool) -> None:
    """torchrun restarted the workers after a failure: continue from the newest checkpoint of this run
    directory, whatever trainer.resume says (it may name the checkpoint the first attempt started from)."""
    from trainer import checkpoint as ckpt_io

    if ckpt_io.list_checkpoints(run_dir / "checkpoints"):
        if typed.trainer.resume != "auto":
            log.info("elastic restart %d: continuing from the newest checkpoint in %s", restart, run_dir)
        typed.trainer.resume = "auto"  # config.yaml records what ran
    elif is_main:
        log.warning(
            "elastic restart %d: no checkpoint in %s, so training starts again from step 0 (if the failed attempt "
            "saved one, it is elsewhere: Hydra's default run directory is new at each launch; pass hydra.run.dir)",
            restart,
            run_dir,
        )
