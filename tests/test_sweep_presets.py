"""The sweep presets compose into valid runs: every Optuna search space names real config keys with values
the trainer accepts, the SLURM launcher preset composes, the comparison preset covers the whole zoo, and
the W&B sweep specs build train.py command lines that compose."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep
from omegaconf import OmegaConf

from optim.builder import load_all
from trainer.config import register_configs
from trainer.entry.cli import compose_config

OPTIMIZERS = sorted(load_all())


def hydra_cfg(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def samples(key: str, spec: str) -> list[str]:
    """Both ends of an Optuna search range (or every choice), as `key=value` overrides."""
    sweep = OverridesParser.create().parse_overrides([f"{key}={spec}"])[0].value()
    if isinstance(sweep, ChoiceSweep):
        return [f"{key}={v}" for v in sweep.list]
    assert isinstance(sweep, IntervalSweep), spec
    if "log" in sweep.tags:
        assert 0 < sweep.start < sweep.end and math.log10(sweep.end / sweep.start) >= 1  # a decade or more
    cast = int if "int(" in spec else float
    return [f"{key}={cast(sweep.start)}", f"{key}={cast(sweep.end)}"]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_has_a_search_space_of_valid_keys(optimizer):
    cfg = hydra_cfg(["+sweep=lr_search", f"optimizer={optimizer}"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    params = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)["params"]  # the resolver picks the file
    assert "optimizer.lr" in params and params["optimizer.lr"].startswith("tag(log")
    ends = [samples(key, spec) for key, spec in params.items()]
    for pick in (0, -1):  # the typed schema rejects an unknown key or a value the trainer would refuse
        compose_config([f"optimizer={optimizer}"] + [both[pick] for both in ends])


def test_slurm_preset_composes_with_cluster_settings():
    cfg = hydra_cfg(["+launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=8",
                     "hydra.launcher.nodes=2"])  # fmt: skip
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == ("gpu", 8, 8, 2)
    assert cfg.trainer.resume == "auto"  # a requeued job continues from its checkpoint
    assert hydra_cfg(["+launcher=local"]).hydra.launcher._target_.endswith("submitit_launcher.LocalLauncher")


def test_compare_optimizers_preset_covers_the_zoo_over_three_seeds():
    cfg = hydra_cfg(["+sweep=compare_optimizers"])
    params = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)["params"]  # ${optimizer_names:}
    assert sorted(params["optimizer"].split(",")) == OPTIMIZERS
    assert params["trainer.seed"].split(",") == ["1", "2", "3"]
    typed = compose_config(["+sweep=compare_optimizers", "optimizer=lion", "trainer.seed=2"])  # one of its jobs
    assert typed.model.n_layer == 4 and typed.data.kind == "stdlib" and typed.trainer.max_steps == 300
    assert typed.trainer.eval_interval < typed.trainer.max_steps / 5  # enough evals to interpolate on


def agent_command(spec: dict, values: dict) -> list[str]:
    """The command line `wandb agent` runs for one sample: the spec's command with its macros filled."""
    cmd = []
    for part in spec["command"]:
        if part == "${args_no_hyphens}":
            cmd += [f"{k}={v}" for k, v in values.items()]
        elif part not in ("${env}", "${interpreter}", "${program}"):
            cmd.append(part)
    return cmd


@pytest.mark.parametrize("spec_path", sorted((REPO / "configs" / "wandb_sweep").glob("*.yaml")), ids=lambda p: p.stem)
def test_wandb_sweep_specs_run_train_py_with_hydra_overrides(spec_path: Path):
    spec = yaml.safe_load(spec_path.read_text())
    assert spec["program"] == "train.py" and "${args_no_hyphens}" in spec["command"]
    assert spec["metric"]["name"] == "val/loss"  # the key the trainer logs at every eval
    for pick in (0, -1):  # the lowest and highest value of every parameter
        values = {}
        for key, p in spec["parameters"].items():
            values[key] = p["values"][pick] if "values" in p else (p["min"], p["max"])[pick]
        compose_config(agent_command(spec, values))
    if spec_path.stem == "compare_optimizers":
        listed = spec["parameters"]["optimizer"]["values"]
        missing, unknown = sorted(set(OPTIMIZERS) - set(listed)), sorted(set(listed) - set(OPTIMIZERS))
        assert not missing and not unknown, f"{spec_path}: add {missing}, remove {unknown} (the registry's names)"
