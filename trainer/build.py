"""Build everything a run needs from its config: data, tokenizer, model, optimizer, schedule, and the
state of a checkpoint when resuming. All bad input is found here, before the first step."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from models.hf import load_hf_weights
from models.minigpt import GPTConfig, MiniGPT
from optim.builder import BuildContext, HookContext, after_load, build_hook, build_optimizer, load_all
from optim.schedules import build_scheduler, constant_scheduler
from trainer import checkpoint as ckpt_io
from trainer.compile import Ledger, compile_key, decide, eager_step_seconds, needs_step_estimate, use_compile_cache
from trainer.config import ModelConfig, TrainConfig
from trainer.data.corpus import check_split_sizes, find_corpus, prepare_tokens
from trainer.data.sampling import WindowSampler
from trainer.data.shards import TokenShards
from trainer.data.tokenizers import build_tokenizer
from trainer.distributed import Dist, barrier, broadcast, checkpoint_blocks, local_device, max_over_ranks, wrap
from trainer.errors import ConfigError
from trainer.resume import (
    apply_changed_hyperparameters,
    check_same_optimizer,
    log_changed_schedule,
    saved_optimizer_config,
)
from trainer.runtime import (
    Numerics,
    autocast,
    check_precision,
    grad_scaler,
    machine_name,
    measured_step,
    pick_device,
    probe_batch,
    resolve_precision,
    seed_everything,
)
from trainer.telemetry.anomaly import AnomalyGuard

log = logging.getLogger(__name__)


@dataclass
class Run:
    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    model: MiniGPT  # the plain module: weights, checkpoints, sampling
    step_model: torch.nn.Module  # what the loop calls (compiled when trainer.compile)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    optimizer_hook: Callable[[int], None] | None  # called after each step (e.g. Sophia's Hessian refresh)
    dist: Dist  # rank, world size, strategy (trainer/distributed.py)
    scaler: torch.amp.GradScaler
    train_windows: WindowSampler
    val_tokens: TokenShards
    tokenizer: object
    seq_len: int
    numerics: Numerics  # the precision trainer.precision resolved to (never auto), and the attention kernel
    anomaly: AnomalyGuard  # non-finite steps, gradient explosions, loss spikes (trainer/telemetry/anomaly.py)
    progress: ckpt_io.Progress  # step, loss window, train seconds: from the checkpoint when resuming
    stateful: dict[str, ckpt_io.Stateful]  # what a checkpoint holds beside the model and the optimizer
    compiled: str | None = None  # the compile ledger's key when step_model is compiled (trainer/compile.py)
    ledger: Ledger | None = None


def torch_cache(cfg: TrainConfig) -> Path:
    """Where compiled code (inductor's caches), its ledger and the precision probe's results live."""
    return Path(cfg.data.cache_dir).expanduser() / "torch"


def step_estimate(cfg: TrainConfig, device: torch.device, numerics: Numerics, measure) -> float | None:
    """The eager optimizer step's seconds, from the (cached) probe's forward+backward, where trainer.compile=auto
    needs it. On the plain module, before wrapping (FSDP's module all-gathers on every rank)."""
    t, seq_len = cfg.trainer, cfg.data.seq_len or cfg.model.block_size
    if not needs_step_estimate(t.compile, device.type, numerics.precision.value):
        return None
    seconds, _ = measure((numerics,))
    sequences = probe_batch(t.micro_batch_size, seq_len)[0]
    return eager_step_seconds(seconds[numerics.name], t.micro_batch_size / sequences * t.grad_accum_steps, device)


def plan_compile(cfg: TrainConfig, model: MiniGPT, device: torch.device, numerics: Numerics, step_s: float | None,
                 steps_left: int, d: Dist, ledger: Ledger) -> tuple[str | None, str]:  # fmt: skip
    """(the compile ledger's key, or None not to compile; why) for trainer.compile (trainer/compile.py)."""
    t, seq_len = cfg.trainer, cfg.data.seq_len or cfg.model.block_size
    key = compile_key(machine=machine_name(device), model=asdict(model.config), seq_len=seq_len,
                      batch=[t.micro_batch_size, t.grad_accum_steps], numerics=numerics.name, strategy=d.strategy,
                      distributed=asdict(cfg.distributed), checkpointing=t.activation_checkpointing)  # fmt: skip
    verdict, why = decide(t.compile, steps_left, step_s, device.type, numerics.precision.value, ledger.get(key))
    return (key if verdict else None), why


def model_config(cfg: ModelConfig, tokenizer_vocab: int) -> GPTConfig:
    return cfg.architecture(tokenizer_vocab)


def prepare_data(cfg: TrainConfig, progress: bool):
    """The tokenizer and the memory-mapped token splits, tokenised first when the cache is missing."""
    cache_dir = Path(cfg.data.cache_dir).expanduser()
    if cfg.data.kind == "hf":
        from trainer.data.hf import cache_report, open_source
        from trainer.data.hfprepare import prepare_hf

        source = open_source(cfg.data)
        tokenizer = build_tokenizer(cfg.tokenizer, source, cache_dir)
        splits = prepare_hf(source, tokenizer, cache_dir, progress=progress)
        if progress:
            log.info("%s", cache_report(splits.train.directory.parent))
        return tokenizer, splits
    corpus = find_corpus(cfg.data)
    tokenizer = build_tokenizer(cfg.tokenizer, corpus, cache_dir)
    splits = prepare_tokens(corpus, tokenizer, cache_dir, cfg.data.val_fraction, progress, cfg.data.shard_tokens)
    return tokenizer, splits


def setup_run(cfg: TrainConfig, run_dir: Path, d: Dist | None = None) -> Run:
    t = cfg.trainer
    d = d or Dist()
    device = local_device(pick_device(t.device), d)
    check_precision(t.precision, device)
    seed_everything(t.seed)

    if not d.is_main:  # rank 0 tokenises and writes the caches; the others then read them
        barrier(d)
    tokenizer, splits = prepare_data(cfg, progress=t.progress and d.is_main)
    if d.is_main:
        barrier(d)
    seq_len = cfg.data.seq_len or cfg.model.block_size
    check_split_sizes(splits, seq_len, t.micro_batch_size)
    gpt_config = model_config(cfg.model, tokenizer.vocab_size)
    if t.sample_tokens > 0:  # a prompt the tokenizer cannot encode would fail after training
        try:
            tokenizer.encode_batch([t.sample_prompt])
        except ValueError as e:
            fix = "change it, or set trainer.sample_tokens=0"
            raise ConfigError(f"trainer.sample_prompt={t.sample_prompt!r}: {e}: {fix}") from None

    ckpt_io.remove_stale_temporaries(run_dir / "checkpoints")
    ckpt, state = ckpt_io.choose_resume(t.resume, run_dir, d)
    if ckpt is not None:
        ckpt_io.check_compatible(state, asdict(gpt_config), tokenizer.identity, ckpt)
        ckpt_io.check_resumable(state, d, ckpt)
        saved_optimizer = saved_optimizer_config(ckpt)
        check_same_optimizer(saved_optimizer, cfg.optimizer, ckpt)
    sharded = state is not None and state["optimizer_format"] == "dcp"

    try:
        model = MiniGPT(gpt_config).to(device)
    except (RuntimeError, MemoryError) as e:  # e.g. a huge model.vocab_size: the allocator's traceback otherwise
        n = gpt_config.vocab_size * gpt_config.n_embd + 12 * gpt_config.n_layer * gpt_config.n_embd**2
        raise ConfigError(
            f"the model (about {n / 1e9:.2f}B parameters, {4 * n / 2**30:.1f} GiB in fp32) does not fit on {device}: "
            f"make model.vocab_size, n_layer or n_embd smaller ({type(e).__name__})"
        ) from None
    if state is not None and not sharded:
        ckpt_io.load_weights(model, ckpt)  # into the plain module, before any wrapping
    elif state is None and cfg.model.init_from is not None:  # a transformers model's weights (models/hf.py)
        try:
            load_hf_weights(model, cfg.model.init_from)
        except ValueError as e:
            raise ConfigError(f"model.init_from: {e}") from None
    use_compile_cache(torch_cache(cfg) / "inductor")  # before anything compiles, in this process
    batch = probe_batch(t.micro_batch_size, seq_len)

    def measure(candidates):  # each candidate's forward+backward seconds for this model (cached probe)
        return measured_step(model, device, batch, torch_cache(cfg) / "probe.json", candidates)

    # rank 0 measures (on the plain module, before wrapping); every rank takes its choice
    numerics = resolve_precision(t.precision, device, measure, str(torch_cache(cfg))) if d.is_main else None
    numerics = broadcast(numerics, d)
    log.info("precision: %s (%s)", numerics.name, numerics.why)
    step_s = step_estimate(cfg, device, numerics, measure) if d.is_main else None  # for trainer.compile=auto
    if t.activation_checkpointing:
        checkpoint_blocks(model)
    wrapped = wrap(model, d, device, cfg.distributed)  # FSDP shards the parameters in place
    global_batch = t.micro_batch_size * t.grad_accum_steps * d.world_size
    ctx = BuildContext(device, global_batch, global_batch * seq_len, cfg.schedule.warmup_steps)
    try:
        optimizer = build_optimizer(model, cfg.optimizer, ctx)  # after wrapping: FSDP's sharded parameters
    except ValueError as e:  # a hyperparameter the optimizer's own constructor rejects
        raise ConfigError(f"optimizer={cfg.optimizer.name}: {e}") from None
    if load_all()[cfg.optimizer.name].schedules_itself:
        if cfg.schedule.name != "constant":
            log.warning("optimizer=%s schedules itself: schedule=%s is ignored (its warmup_steps=%d apply)",
                        cfg.optimizer.name, cfg.schedule.name, cfg.schedule.warmup_steps)  # fmt: skip
        scheduler = constant_scheduler(optimizer)  # the optimizer schedules (and warms up) itself
    else:
        scheduler = build_scheduler(optimizer, cfg.schedule, t.max_steps)
    if cfg.schedule.warmup_steps >= t.max_steps:
        log.warning("schedule.warmup_steps=%d >= trainer.max_steps=%d: the run ends before its warmup does, so the "
                    "lr never reaches optimizer.lr", cfg.schedule.warmup_steps, t.max_steps)  # fmt: skip
    scaler = grad_scaler(numerics.precision, device)
    windows = WindowSampler(
        splits.train, seq_len, t.micro_batch_size, t.seed, device, d.rank, d.world_size, cfg.data.sampling
    )
    hook_ctx = HookContext(windows.peek, autocast(numerics, device), t.grad_accum_steps, t.grad_clip)
    hook = build_hook(wrapped, optimizer, cfg.optimizer, hook_ctx)
    reduce_max = (lambda flags: max_over_ranks(flags, d)) if d.enabled else None
    guard = AnomalyGuard(t.anomaly, device, fp16=numerics.precision.value == "fp16", reduce_max=reduce_max)
    progress = ckpt_io.Progress()
    stateful = {"scheduler": scheduler, "scaler": scaler, "sampler": windows, "rng": ckpt_io.RNG(device),
                "anomaly": guard, ckpt_io.PROGRESS: progress}  # fmt: skip
    if state is not None:
        ckpt_io.restore(ckpt, state, model, optimizer, stateful)
        after_load(optimizer, cfg.optimizer)  # schedule-free: checkpoints hold the eval-mode average
        apply_changed_hyperparameters(optimizer, scheduler, model, saved_optimizer, cfg.optimizer, ctx)
        log_changed_schedule(ckpt, cfg.schedule, t.max_steps)
        progress.resumed_from = ckpt
        del state  # drop the loaded optimizer tensors: they are copied into the optimizer now
        log.info("resumed from %s at step %d", ckpt, progress.step)
        if progress.step >= t.max_steps:
            log.info("checkpoint step %d >= trainer.max_steps=%d: nothing to train", progress.step, t.max_steps)

    steps_left = max(0, t.max_steps - progress.step)
    ledger = Ledger(torch_cache(cfg) / "compiled.json")
    plan = plan_compile(cfg, model, device, numerics, step_s, steps_left, d, ledger) if d.is_main else None
    compiled, why = broadcast(plan, d)
    log.info("compile: %s (%s)", "yes" if compiled else "no", why)
    step_model = torch.compile(wrapped) if compiled else wrapped
    log.info(
        "model: %.2fM parameters (%.2fM non-embedding), %.1f MFLOP/token | data: %s train / %s val tokens "
        "(%s, vocab %d) | device %s, %s | global batch %d x %d tokens (%s, %d ranks)",
        model.num_params() / 1e6, model.num_params(non_embedding=True) / 1e6,
        model.flops_per_token(seq_len) / 1e6, f"{len(splits.train):,}", f"{len(splits.val):,}",
        tokenizer.identity, tokenizer.vocab_size, device, numerics.name, global_batch, seq_len, d.strategy,
        d.world_size,
    )  # fmt: skip
    return Run(
        cfg=cfg, run_dir=run_dir, device=device, model=model, step_model=step_model, optimizer=optimizer,
        scheduler=scheduler, optimizer_hook=hook, scaler=scaler, train_windows=windows, val_tokens=splits.val,
        tokenizer=tokenizer, seq_len=seq_len, numerics=numerics, dist=d, anomaly=guard, progress=progress,
        stateful=stateful, compiled=compiled, ledger=ledger,
    )  # fmt: skip
