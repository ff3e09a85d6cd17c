"""The benchmark's typed config (configs/benchmark/<preset>.yaml plus key=value overrides) and its checks.

Every problem is a ConfigError with one line, raised before any run: an unknown key or optimizer, a
budget too small for one evaluation, an empty search space, a model or regime the trainer refuses.
`settings()` composes each (size, optimizer)'s train.py config exactly as its runs will, so whatever the
trainer would refuse is refused here first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.errors import ConfigError
from trainer.lab.benchmark.axes import WARMUP, Axis, axes_for

PRESETS = Path(__file__).resolve().parents[3] / "configs" / "benchmark"


@dataclass
class SizeConfig:
    name: str = MISSING
    model: list[str] = field(default_factory=list)  # train.py overrides that make this model
    budgets: list[float] = MISSING  # tokens per parameter; every optimizer runs each one in full
    baseline_budgets: list[float] = field(default_factory=list)  # more budgets for the baseline's curve only
    tune_budget: float | None = None  # the budget tuning runs at; None: the smallest of `budgets`


@dataclass
class BenchmarkConfig:
    optimizers: list[str] = MISSING
    baseline: str = "adamw"
    sizes: list[SizeConfig] = MISSING
    regime: list[str] = field(default_factory=list)  # train.py overrides every run shares
    trials: int = 12  # coordinate-descent trials per optimizer and size, defaults included
    tune_seed: int = 0  # the seed of the tuning runs; never one of `seeds`
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])  # confirmation seeds
    grid_factor: float = 2.0  # ratio between neighbouring grid values (1 - beta for betas)
    zero_steps: int = 3  # grid steps from a weight decay's default down to the last value above 0
    warmup_fraction: float = 0.1  # the default warmup, as a fraction of each run's steps (then tuned)
    evals_per_run: int = 8  # evaluations per run (and one at step 0 and at the end)
    eval_batches: int = 8  # validation batches per evaluation (trainer.eval_steps)
    world_size: int = 1  # processes per run (ranks): the global batch is micro x accumulation x this
    coordinates: dict[str, list[str]] = field(default_factory=dict)  # optimizer -> the keys to tune (default all)
    defaults_table: bool = True  # also run every optimizer at its defaults (the untuned comparison)
    bootstrap: int = 2000  # bootstrap replicates of each speedup's interval
    confidence: float = 0.95
    alpha: float = 0.05  # significance level of the verdicts (Holm-corrected across optimizers)


# Every benchmark run: resumable in place, no sampling or per-layer statistics, no progress bar in the logs.
FIXED = ["trainer.resume=auto", "trainer.progress=false", "trainer.sample_tokens=0", "trainer.stats_interval=0",
         "trainer.keep_checkpoints=1"]  # fmt: skip


def load_config(preset: str, overrides: list[str]) -> BenchmarkConfig:
    """A preset name (configs/benchmark/NAME.yaml) or a YAML path, with dotted key=value overrides."""
    path = Path(preset) if preset.endswith((".yaml", ".yml")) else PRESETS / f"{preset}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise ConfigError(f"benchmark preset {preset!r} not found (presets: {names}; or give a .yaml path)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(BenchmarkConfig), OmegaConf.load(path))
        for item in overrides:  # OmegaConf.update reaches into lists (sizes.0.budgets=[...]); from_dotlist cannot
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"{item!r} is not key=value")
            OmegaConf.update(merged, key, yaml.safe_load(value), merge=False)
        cfg: BenchmarkConfig = OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"benchmark config: {str(e).splitlines()[0]}") from None
    check(cfg)
    return cfg


def check(cfg: BenchmarkConfig) -> None:
    """The checks that need no train.py config (settings() makes the others)."""
    from optim.builder import load_all

    known = load_all()
    for name in cfg.optimizers:
        if name not in known:
            raise ConfigError(f"optimizers: {name!r} is not one of {', '.join(sorted(known))}")
    if len(set(cfg.optimizers)) != len(cfg.optimizers):
        raise ConfigError(f"optimizers: {cfg.optimizers} names one optimizer twice")
    if cfg.baseline not in cfg.optimizers:
        raise ConfigError(f"baseline={cfg.baseline!r} must be one of the optimizers ({', '.join(cfg.optimizers)})")
    for name in cfg.coordinates:
        if name not in cfg.optimizers:
            raise ConfigError(f"coordinates.{name}: {name!r} is not one of the optimizers")
    if not cfg.sizes or len({s.name for s in cfg.sizes}) != len(cfg.sizes):
        raise ConfigError("sizes: give at least one model size, each with its own name")
    for s in cfg.sizes:
        budgets = [*s.budgets, *s.baseline_budgets]
        if not s.budgets or any(not math.isfinite(b) or b <= 0 for b in budgets):
            raise ConfigError(f"sizes.{s.name}.budgets: give positive budgets in tokens per parameter (got {budgets})")
        if len(set(budgets)) < 3:
            raise ConfigError(f"sizes.{s.name}: the baseline needs at least 3 distinct budgets for its loss curve "
                              f"(E + A D^-alpha has 3 parameters); add budgets or baseline_budgets")  # fmt: skip
        if s.tune_budget is not None and s.tune_budget <= 0:
            raise ConfigError(f"sizes.{s.name}.tune_budget={s.tune_budget} must be > 0")
    if cfg.trials < 1:
        raise ConfigError(f"trials={cfg.trials} must be at least 1 (the first trial is the defaults)")
    if len(set(cfg.seeds)) < 2:
        raise ConfigError(f"seeds={cfg.seeds}: give at least 2 distinct seeds (3 or more for the protocol)")
    if cfg.tune_seed in cfg.seeds:
        raise ConfigError(f"tune_seed={cfg.tune_seed} is one of seeds: the confirmation runs need fresh seeds "
                          f"(the tuning run of the chosen config was picked for being low)")  # fmt: skip
    positive = {"grid_factor": cfg.grid_factor - 1, "evals_per_run": cfg.evals_per_run,
                "eval_batches": cfg.eval_batches, "world_size": cfg.world_size, "bootstrap": cfg.bootstrap}  # fmt: skip
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be {'> 1' if key == 'grid_factor' else '>= 1'}")
    if not 0 <= cfg.warmup_fraction <= 0.5:
        raise ConfigError(f"warmup_fraction={cfg.warmup_fraction} must be in [0, 0.5]")
    if not 0 < cfg.confidence < 1 or not 0 < cfg.alpha < 1:
        raise ConfigError("confidence and alpha must be in (0, 1)")


@dataclass
class Setting:
    """One (size, optimizer): its composed train.py config and everything its runs are made from."""

    size: SizeConfig
    optimizer: str
    train: object  # the TrainConfig its runs start from (before budgets, seeds and tuned values)
    base: list[str]  # the train.py overrides of every run of this setting (regime, model, optimizer)
    params: int  # the model's parameters (tied embedding once), what tokens per parameter divide by
    tokens_per_step: int
    axes: list[Axis]
    defaults: dict[str, float]  # axis key -> the value tuning starts from
    lists: dict[str, list]  # a list-valued config key (optimizer.betas) -> its default list

    def steps(self, budget: float) -> int:
        return max(0, round(budget * self.params / self.tokens_per_step))


def settings(cfg: BenchmarkConfig) -> list[Setting]:
    """Compose and check every (size, optimizer): its model, data and optimizer, its search space, its budgets."""
    from optim.builder import load_all

    out, vocabs = [], {}
    for size in cfg.sizes:
        for name in cfg.optimizers:
            base = [*cfg.regime, *size.model, f"optimizer={name}"]
            train = _compose(base, f"size {size.name}, optimizer {name}")
            data_key = (repr(train.data), repr(train.tokenizer))
            if data_key not in vocabs:
                vocabs[data_key] = _vocab(train)
            params = _params(train, vocabs[data_key])
            seq = train.data.seq_len or train.model.block_size
            tokens = train.trainer.micro_batch_size * train.trainer.grad_accum_steps * seq * cfg.world_size
            space = {(WARMUP if k == "schedule.warmup_steps" else k): v for k, v in load_all()[name].space().items()}
            wanted = cfg.coordinates.get(name)
            if wanted is not None:
                unknown = sorted(set(wanted) - set(space))
                if unknown:
                    raise ConfigError(f"coordinates.{name}: {unknown} not in its search space ({', '.join(space)})")
                space = {k: v for k, v in space.items() if k in wanted}
            if not space:
                raise ConfigError(f"optimizer {name} has an empty search space: nothing to tune (its spec's "
                                  f"search_space in optim/, or coordinates.{name})")  # fmt: skip
            defaults = {k: cfg.warmup_fraction if k == WARMUP else float(_get(train, k)) for k in space}
            lists = {k.rsplit(".", 1)[0]: list(_get(train, k.rsplit(".", 1)[0])) for k in space if _indexed(k)}
            try:
                lr_keys = tuple(f"optimizer.{f}" for f in load_all()[name].lr_fields)
                axes = axes_for(space, defaults, cfg.grid_factor, cfg.zero_steps, lr_keys)
            except ValueError as e:
                raise ConfigError(f"optimizer {name}: {e}") from None
            setting = Setting(size, name, train, base, params, tokens, axes, defaults, lists)
            _check_budgets(cfg, setting)
            out.append(setting)
    return out


def _check_budgets(cfg: BenchmarkConfig, s: Setting) -> None:
    budgets = [*s.size.budgets, *s.size.baseline_budgets, tune_budget(s.size)]
    for b in budgets:
        if s.steps(b) < cfg.evals_per_run:
            raise ConfigError(
                f"sizes.{s.size.name}: a budget of {b:g} tokens/parameter is {b * s.params:,.0f} tokens = "
                f"{s.steps(b)} steps of {s.tokens_per_step} tokens, too few for one evaluation interval "
                f"(evals_per_run={cfg.evals_per_run}): raise the budget or lower evals_per_run"
            )


def tune_budget(size: SizeConfig) -> float:
    return size.tune_budget if size.tune_budget is not None else min(size.budgets)


def _indexed(key: str) -> bool:
    return key.rsplit(".", 1)[-1].isdigit()


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _compose(overrides: list[str], where: str):
    from hydra.errors import HydraException

    from trainer.entry.cli import compose_config, one_line

    try:
        return compose_config(overrides)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"{where}: {one_line(e)}") from None


def _vocab(train) -> int:
    """The tokenizer's vocabulary (byte and hf need no corpus; char and bpe are built from it and cached)."""
    from trainer.data.corpus import find_corpus
    from trainer.data.tokenizers import build_tokenizer

    if train.data.kind == "hf":
        from trainer.data.hf import open_source

        source = open_source(train.data)
    else:
        source = find_corpus(train.data)
    return build_tokenizer(train.tokenizer, source, Path(train.data.cache_dir).expanduser()).vocab_size


def prepare(settings_: list[Setting]) -> None:
    """Tokenise each distinct corpus into its cache once, before the first run (not in every job at once)."""
    from trainer.build import prepare_data

    done = set()
    for s in settings_:
        key = (repr(s.train.data), repr(s.train.tokenizer))
        if key not in done:
            prepare_data(s.train, progress=True)
            done.add(key)


def _params(train, vocab: int) -> int:
    import torch

    from models.minigpt import MiniGPT
    from trainer.build import model_config

    with torch.device("meta"):  # no memory, no init: only the shapes
        return MiniGPT(model_config(train.model, vocab)).num_params()
