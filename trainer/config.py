"""Typed structured configs: the schema every YAML under configs/ is checked against.

Each config group has a dataclass here, stored in Hydra's ConfigStore as `<group>_schema`, and each
YAML option lists it first in its defaults (`/<group>_schema@_here_`). A misspelt key or a value of
the wrong type is therefore rejected by Hydra while composing, before any work.
Value checks that types cannot express (lr > 0, betas in [0, 1), ...) live in `validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from models.minigpt import GPTConfig
from optim.builder import OptimizerConfig, fsdp_errors, load_all, optimizer_errors
from optim.schedules import ScheduleConfig
from trainer.errors import ConfigError


class Precision(str, Enum):
    auto = "auto"  # what is fast for this device and model (trainer/runtime.py: resolve_precision)
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class AnomalyAction(str, Enum):
    warn = "warn"
    skip = "skip"
    stop = "stop"


@dataclass
class AnomalyConfig:
    """What to do about bad steps (trainer/telemetry/anomaly.py): warn | skip | stop."""

    nonfinite: AnomalyAction = AnomalyAction.skip  # inf/NaN loss or gradient norm
    grad_explosion: AnomalyAction = AnomalyAction.warn  # grad norm > grad_explosion_factor x its running median
    grad_explosion_factor: float = 10.0
    loss_spike: AnomalyAction = AnomalyAction.warn  # loss z-score against its running mean and variance
    loss_spike_zscore: float = 6.0
    window: int = 100  # steps behind the running median, mean and variance
    max_consecutive_skips: int = 5  # then stop


class DeviceKind(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class WandbMode(str, Enum):
    auto = "auto"  # online when logged in, offline otherwise
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class ModelConfig(GPTConfig):
    """The `model` group: the architecture (models/minigpt.py:GPTConfig declares its fields and checks)
    and how the vocabulary is sized from the tokenizer."""

    vocab_size: int | None = None  # None: the tokenizer's size, padded to pad_vocab_multiple
    pad_vocab_multiple: int = 64  # round the embedding up for faster matmuls (50257 -> 50304)
    # A local transformers GPT-2, Llama or Qwen3 directory to start from: its architecture, tokenizer and
    # weights (models/hf.py). Fields left at their defaults are taken from it; one set otherwise must agree.
    init_from: str | None = None

    def validate(self) -> None:
        super().validate()
        if self.pad_vocab_multiple < 1:
            raise ValueError(f"model.pad_vocab_multiple={self.pad_vocab_multiple} must be at least 1")

    def architecture(self, tokenizer_vocab: int) -> GPTConfig:
        """The model to build for a tokenizer of this size: these fields, with the vocabulary filled in."""
        vocab = self.vocab_size
        if vocab is None:
            vocab = -(-tokenizer_vocab // self.pad_vocab_multiple) * self.pad_vocab_multiple
        elif vocab < tokenizer_vocab:
            raise ConfigError(
                f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary ({tokenizer_vocab}): "
                f"set model.vocab_size=null to take the tokenizer's size"
            )
        return GPTConfig(**{f.name: getattr(self, f.name) for f in fields(GPTConfig)} | {"vocab_size": vocab})


@dataclass
class DataConfig:
    kind: str = "stdlib"  # stdlib | text | hf
    path: str | None = None  # data=text: a file, a directory or a glob
    seq_len: int | None = None  # training sequence length; None: model.block_size
    val_fraction: float = 0.05  # held out for validation (of the tokens; data=hf: of the documents)
    cache_dir: str = ".cache/data"  # token caches, keyed by corpus and tokenizer
    sampling: str = "random"  # random | sequential windows (trainer/data/sampling.py)
    shard_tokens: int = 100_000_000  # tokens per shard file at most
    # data=hf (trainer/data/hf.py): datasets.load_dataset(name, subset, split=split, data_files=...)
    name: str | None = None  # a hub id, a local dataset directory, or a save_to_disk directory
    subset: str | None = None  # the dataset's configuration, e.g. sample-10BT
    split: str = "train"
    val_split: str | None = None  # a held-out split for validation; None: val_fraction of the documents
    text_field: str = "text"
    streaming: bool = False  # read the hub dataset as a stream instead of downloading it first
    data_files: Any = None  # local files: a path, glob, list, or {split: paths}
    data_format: str | None = None  # json | parquet | csv | text; None: from the data_files extension
    num_proc: int | None = None  # tokenising processes; None: the CPU count, at most 8
    max_tokens: int | None = None  # stop after this many tokens (train + val): a subset of a large dataset
    val_max_tokens: int = 10_000_000  # data.val_split: tokens kept from it at most


@dataclass
class TokenizerConfig:
    kind: str = "byte"  # byte | char | bpe | hf
    vocab_size: int = 4096  # tokenizer=bpe: size to train
    name: str | None = None  # tokenizer=hf: a hub id or a local directory


@dataclass
class TrainerConfig:
    """The `trainer` group (configs/trainer/default.yaml takes these defaults as they are)."""

    max_steps: int = 1000  # optimizer steps
    micro_batch_size: int = 32  # sequences per forward pass on each rank
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    # auto: bf16 on GPUs that have it, fp16 on older ones, on CPU the faster of fp32 and bf16 for this model
    # (measured once per machine and model shape, cached in the data cache) | bf16 | fp16 (with loss scaling) | fp32
    precision: Precision = Precision.auto
    grad_clip: float = 1.0  # max global L2 norm; 0 = off
    grad_clip_value: float = 0.0  # max |grad| per element; 0 = off
    eval_interval: int = 200  # steps between evaluations (and one at the end)
    eval_steps: int = 20  # validation batches per evaluation
    log_interval: int = 10  # steps between log records (the host syncs happen here)
    ckpt_interval: int = 500  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # the newest N are kept
    seed: int = 1337
    device: DeviceKind = DeviceKind.auto  # auto | cpu | cuda | mps
    # torch.compile the (wrapped) model: true | false | auto (when the run is long enough to win the compile time
    # back, trainer/compile.py); compiled code is cached in <data.cache_dir>/torch, so a second run pays seconds
    compile: Any = "auto"
    activation_checkpointing: bool = False  # recompute each block's activations in backward (saves memory)
    resume: str | None = None  # null | auto | a checkpoint or run directory
    start_over: bool = False  # a used run directory: archive its run (into replaced-<time>/) and start again
    sample_tokens: int = 300  # text sampled at the end (0 = none)
    sample_prompt: str = "\n"
    sample_temperature: float = 0.8
    sample_top_k: int = 40
    progress: bool = True  # a progress bar on rank 0
    stats_interval: int = 100  # per-layer and optimizer-state statistics every N steps (a multiple of
    # log_interval); 0 = off
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)


@dataclass
class DistributedConfig:
    strategy: str = "auto"  # auto | none | ddp | fsdp
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    timeout_s: int = 1800  # collective timeout
    # fsdp (FSDP2, fully_shard per block then the root):
    param_dtype: str = "bf16"  # bf16 | fp32: the dtype parameters are gathered in for compute
    reduce_dtype: str = "fp32"  # bf16 | fp32: the dtype gradients are reduced in
    reshard_after_forward: bool = True  # True: ZeRO-3 style; False: keep gathered until backward (ZeRO-2)
    cpu_offload: bool = False  # keep sharded parameters, gradients and optimizer state on the CPU


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.auto
    project: str = "minigpt"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    tokenizer: TokenizerConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    schedule: ScheduleConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    distributed: DistributedConfig = MISSING


GROUP_SCHEMAS = {
    "model": ModelConfig,
    "data": DataConfig,
    "tokenizer": TokenizerConfig,
    "schedule": ScheduleConfig,
    "trainer": TrainerConfig,
    "logger": LoggerConfig,
    "distributed": DistributedConfig,
}


def search_space(*, _root_: DictConfig) -> DictConfig | None:
    """The Optuna search space of the run's optimizer (`${search_space:}` in configs/sweep/lr_search.yaml),
    from its spec (optim/builder.py: OptimizerSpec.search_space). A resolver rather than a defaults-list
    interpolation, because Hydra composes `+sweep=...` before it knows the optimizer."""
    name = OmegaConf.select(_root_, "optimizer.name", default=None)
    if name is None:  # Hydra resolves it once on the preset alone, while merging it
        return None
    if name not in load_all():
        raise ConfigError(f"optimizer.name={name!r} is not one of {', '.join(sorted(load_all()))}")
    return OmegaConf.create(load_all()[name].space())


def optimizer_names() -> str:
    """Every registered optimizer, comma-separated: the sweep over the zoo (`${optimizer_names:}` in
    configs/sweep/compare_optimizers.yaml), so a new optimizer joins the comparison by registering."""
    return ",".join(load_all())


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore and register the config resolvers (idempotent)."""
    if not OmegaConf.has_resolver("search_space"):
        OmegaConf.register_new_resolver("search_space", search_space, use_cache=False)
    if not OmegaConf.has_resolver("optimizer_names"):
        OmegaConf.register_new_resolver("optimizer_names", optimizer_names)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(name=f"{group}_schema", node=schema)  # not a group, so --help does not list it
    for name, spec in load_all().items():  # each optimizer has its own schema (optim/)
        cs.store(name=f"optimizer_{name}_schema", node=spec.config)


def to_typed(cfg: DictConfig | Any) -> TrainConfig:
    """Turn a composed DictConfig into TrainConfig dataclasses (enums included), then validate. The run
    holds only this form from here on; config.yaml and W&B's config are written from it."""
    typed = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg
    resolve_init_from(typed)
    validate(typed)
    return typed


def resolve_init_from(cfg: TrainConfig) -> None:
    """model.init_from=PATH: the architecture fields and the tokenizer come from PATH (models/hf.py reads
    its config.json; trainer/build.py loads its weights)."""
    m, tok = cfg.model, cfg.tokenizer
    if m.init_from is None:
        return
    from models.hf import init_fields

    m.init_from = str(Path(m.init_from).expanduser())  # the tokenizer's loader does not expand ~
    try:
        fields = init_fields(m.init_from, m)
    except ValueError as e:
        raise ConfigError(f"model.init_from: {e}") from None
    if tok.kind not in ("byte", "hf") or tok.kind == "hf" and tok.name not in (None, m.init_from):
        raise ConfigError(f"model.init_from={m.init_from} brings its own tokenizer: drop tokenizer={tok.kind} "
                          f"{tok.name or ''}".rstrip())  # fmt: skip
    for key, value in fields.items():
        setattr(m, key, value)
    tok.kind, tok.name = "hf", m.init_from


def config_dict(cfg: TrainConfig) -> dict:
    """Plain nested dicts (enums as strings): W&B's run config."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def config_yaml(cfg: TrainConfig) -> str:
    """The YAML of config.yaml, in a run directory and in each checkpoint."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


CHOICES = {
    "data.kind": ("stdlib", "text", "hf"),
    "data.sampling": ("random", "sequential"),
    "tokenizer.kind": ("byte", "char", "bpe", "hf"),
    "distributed.strategy": ("auto", "none", "ddp", "fsdp"),
    "distributed.param_dtype": ("bf16", "fp32"),
    "distributed.reduce_dtype": ("bf16", "fp32"),
    "distributed.backend": ("auto", "nccl", "gloo"),
}


def _get(cfg: TrainConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: TrainConfig) -> None:
    """Raise ConfigError naming the first bad value and how to fix it."""
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not one of {', '.join(allowed)}")
    m, t, o, s = cfg.model, cfg.trainer, cfg.optimizer, cfg.schedule
    positive = {
        "trainer.max_steps": t.max_steps,
        "trainer.micro_batch_size": t.micro_batch_size, "trainer.grad_accum_steps": t.grad_accum_steps,
        "trainer.eval_interval": t.eval_interval, "trainer.eval_steps": t.eval_steps,
        "trainer.log_interval": t.log_interval, "trainer.ckpt_interval": t.ckpt_interval,
        "trainer.keep_checkpoints": t.keep_checkpoints,
    }  # fmt: skip
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    if t.stats_interval < 0 or t.stats_interval % t.log_interval:
        raise ConfigError(
            f"trainer.stats_interval={t.stats_interval} must be a multiple of trainer.log_interval="
            f"{t.log_interval} (statistics are read at log steps), or 0 to turn them off"
        )
    if not 0 <= t.seed < 2**32:
        raise ConfigError(f"trainer.seed={t.seed} must be in [0, 2^32) (numpy and torch seeds are 32-bit)")
    if t.compile not in (True, False, "auto"):
        raise ConfigError(f"trainer.compile={t.compile!r} must be true, false or auto")
    if t.start_over and t.resume is not None:
        raise ConfigError(
            f"trainer.start_over=true starts the run again, trainer.resume={t.resume!r} continues one: drop one of them"
        )
    an = t.anomaly
    if an.window < 4 or an.max_consecutive_skips < 1 or an.grad_explosion_factor <= 1 or an.loss_spike_zscore <= 0:
        raise ConfigError(
            "trainer.anomaly needs window >= 4, max_consecutive_skips >= 1, grad_explosion_factor > 1 and "
            f"loss_spike_zscore > 0 (got {an.window}, {an.max_consecutive_skips}, {an.grad_explosion_factor}, "
            f"{an.loss_spike_zscore})"
        )
    try:
        m.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    seq_len = cfg.data.seq_len
    if seq_len is not None and not 1 <= seq_len <= m.block_size:
        raise ConfigError(
            f"data.seq_len={seq_len} is larger than the model allows (model.block_size={m.block_size}): "
            f"raise model.block_size or lower data.seq_len"
        )
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in (0, 1)")
    if cfg.data.kind == "text" and not cfg.data.path:
        raise ConfigError("data=text needs data.path=FILE, DIRECTORY or GLOB")
    d = cfg.data
    if d.kind == "hf" and not (d.name or d.data_files):
        raise ConfigError("data=hf needs data.name=HUB_ID or a local dataset directory, or data.data_files=PATHS")
    if d.shard_tokens < 1 or (d.max_tokens is not None and d.max_tokens < 1) or d.val_max_tokens < 1:
        raise ConfigError("data.shard_tokens, data.max_tokens and data.val_max_tokens must be at least 1")
    if d.num_proc is not None and d.num_proc < 1:
        raise ConfigError(f"data.num_proc={d.num_proc} must be at least 1 (or null for the CPU count)")
    if d.data_format not in (None, "json", "parquet", "csv", "text", "arrow"):
        raise ConfigError(f"data.data_format={d.data_format!r} is not one of json, parquet, csv, text, arrow")
    if cfg.tokenizer.kind == "hf" and not cfg.tokenizer.name:
        raise ConfigError("tokenizer=hf needs tokenizer.name=HUB_ID or a local directory")
    if cfg.tokenizer.kind == "bpe" and not 257 <= cfg.tokenizer.vocab_size <= 2**20:
        raise ConfigError(f"tokenizer.vocab_size={cfg.tokenizer.vocab_size} must be in [257, 1048576] for bpe")
    try:
        s.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    problem = optimizer_errors(o)
    if problem:
        raise ConfigError(problem)
    spec = load_all()[o.name]
    if cfg.distributed.strategy == "fsdp" and (problem := fsdp_errors(o)):
        raise ConfigError(problem)
    if type(o) is not spec.config:
        raise ConfigError(
            f"optimizer.name={o.name} does not match the optimizer group: select it with optimizer={o.name}"
        )
    if t.grad_clip < 0 or t.grad_clip_value < 0:
        raise ConfigError("trainer.grad_clip and trainer.grad_clip_value must be >= 0 (0 turns them off)")
    if t.sample_tokens < 0 or t.sample_temperature < 0 or t.sample_top_k < 0:
        raise ConfigError("trainer.sample_tokens, sample_temperature and sample_top_k must be >= 0")
