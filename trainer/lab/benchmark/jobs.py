"""One benchmark run as a train.py job: its overrides, its directory name, and its Hydra config file.

A job is identified by what it trains, nothing else: its directory under runs/ is named after the size,
optimizer, budget and seed, plus a hash of its overrides (as key -> value, so their order does not
matter). Two phases that need the same run (a confirmation at the default hyperparameters, say) share one
directory, and a benchmark that is run again finds its finished runs where it left them.

Hydra's sweepers launch the cartesian product of their parameters, not a list of unrelated jobs, so
each job is written as a config file `jobs/bench_job/<key>.yaml` and the sweep runs over one parameter:

    python train.py -m --config-dir OUT/jobs +bench_job=KEY1,KEY2,... hydra.sweep.dir=OUT/runs [launcher]

Each file selects its options in its defaults list (as configs/experiment/ presets do), sets its values,
and names its own run directory (hydra.sweep.subdir), so any Hydra launcher (local processes,
submitit/SLURM) runs exactly these jobs, each in OUT/runs/<key>/.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from trainer.lab.benchmark.axes import WARMUP
from trainer.lab.benchmark.config import FIXED, BenchmarkConfig, Setting

GROUP = "bench_job"


@dataclass(frozen=True)
class Job:
    phase: str  # tune | tuned | default: why it runs (not part of its identity)
    size: str
    optimizer: str
    budget: float  # tokens per parameter
    seed: int
    values: tuple[tuple[str, float], ...]  # the tuned hyperparameters: (axis key, value)
    steps: int
    overrides: tuple[str, ...]  # everything train.py gets
    key: str  # the run directory's name

    @property
    def hparams(self) -> dict[str, float]:
        return dict(self.values)


def _fmt(v) -> str:
    if isinstance(v, float):
        return repr(float(f"{v:.6g}"))
    if isinstance(v, list):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return str(v)


def make_job(cfg: BenchmarkConfig, s: Setting, values: dict[str, float], budget: float, seed: int, phase: str) -> Job:
    steps = s.steps(budget)
    every = max(1, math.ceil(steps / cfg.evals_per_run))
    lists = {k: list(v) for k, v in s.lists.items()}
    hp = []
    for key, value in values.items():
        if key == WARMUP:
            hp.append(f"schedule.warmup_steps={round(value * steps)}")
        elif key.rsplit(".", 1)[-1].isdigit():
            head, index = key.rsplit(".", 1)
            lists[head][int(index)] = value
        else:
            hp.append(f"{key}={_fmt(value)}")
    hp += [f"{k}={_fmt(v)}" for k, v in lists.items()]
    run = [f"trainer.max_steps={steps}", f"trainer.eval_interval={every}", f"trainer.log_interval={every}",
           f"trainer.ckpt_interval={steps}", f"trainer.eval_steps={cfg.eval_batches}",
           f"trainer.seed={seed}"]  # fmt: skip
    overrides = (*s.base, *hp, *run, *FIXED)
    effective = dict(o.partition("=")[::2] for o in overrides)  # key -> value, the last one winning as in Hydra
    digest = hashlib.sha256(json.dumps(sorted(effective.items())).encode()).hexdigest()[:10]
    key = f"{s.size.name}-{s.optimizer}-{budget:g}tpp-seed{seed}-{digest}"
    return Job(phase, s.size.name, s.optimizer, float(budget), seed, tuple(values.items()), steps, overrides, key)


def job_config(job: Job) -> str:
    """The job's Hydra config file: `group=option` overrides become defaults-list entries, key=value ones values."""
    defaults, dotted = [], []
    for o in job.overrides:
        key, _, value = o.partition("=")
        name = key.lstrip("+")
        if "." not in name:
            defaults.append({f"/{name}" if key.startswith("+") else f"override /{name}": value})
        else:
            dotted.append(f"{name}={value}")
    body = OmegaConf.to_container(OmegaConf.from_dotlist(dotted))
    body["hydra"] = {"sweep": {"subdir": job.key}}
    text = yaml.safe_dump({"defaults": [*defaults, "_self_"], **body}, sort_keys=False)
    return f"# @package _global_\n# benchmark job {job.key}\n{text}"


def write_job(job: Job, jobs_dir: Path) -> None:
    path = jobs_dir / GROUP / f"{job.key}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = job_config(job)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
