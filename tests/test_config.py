"""Config composition: every option composes; typos, wrong types and bad values are rejected."""

from __future__ import annotations

import pytest
from conftest import REPO, compose_cfg
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from trainer.config import Precision, TrainConfig, to_typed
from trainer.errors import ConfigError

GROUPS = ["model", "data", "tokenizer", "optimizer", "schedule", "trainer", "logger", "distributed"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "configs" / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g in GROUPS for o in options(g)] + [f"+experiment={o}" for o in options("experiment")]
)
def test_every_option_composes_and_validates(override):
    extra = {"data=text": ["data.path=/some/file.txt"], "data=hf": ["data.name=some/dataset"]}.get(override, [])
    raw = compose_cfg([override, *extra])
    assert isinstance(to_typed(raw), TrainConfig)
    group, _, option = override.lstrip("+").partition("=")
    if group != "experiment":  # the option's own values are what was composed
        values = OmegaConf.load(REPO / "configs" / group / f"{option}.yaml")
        values.pop("defaults")
        for key in extra:
            values.pop(key.split("=")[0].split(".")[-1], None)
        assert_subset(values, raw[group], group)


def assert_subset(expected, actual, where: str) -> None:
    for key, value in expected.items():
        if isinstance(value, DictConfig):
            assert_subset(value, actual[key], f"{where}.{key}")
        else:
            assert actual[key] == value, f"{where}.{key}"


def test_each_group_has_options():
    for group in GROUPS + ["experiment"]:
        assert options(group), group
    assert {"nano", "gpt2", "gpt2-medium"} <= set(options("model"))
    assert {"constant", "linear", "cosine", "wsd", "step", "exponential", "inverse_sqrt"} == set(options("schedule"))
    assert {"char", "byte", "bpe", "hf"} <= set(options("tokenizer"))
    assert "gpt2_124m" in options("experiment")


def test_defaults_are_the_cpu_run():
    cfg = to_typed(compose_cfg([]))
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.data.kind, cfg.tokenizer.kind) == (4, 128, "stdlib", "byte")
    assert cfg.trainer.precision == Precision.auto and cfg.trainer.compile == "auto" and cfg.optimizer.name == "adamw"


def test_experiment_presets_override_groups():
    cfg = to_typed(compose_cfg(["+experiment=gpt2_124m"]))
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (12, 12, 768, 1024)
    assert cfg.optimizer.lr == 6e-4 and cfg.tokenizer.kind == "hf" and cfg.trainer.compile


def test_misspelt_key_is_rejected_naming_it():
    with pytest.raises(Exception, match="max_stpes") as info:
        compose_cfg(["trainer.max_stpes=5"])
    assert isinstance(info.value.__cause__, ConfigKeyError) or "not in" in str(info.value.__cause__)


def test_wrong_type_is_rejected():
    with pytest.raises(Exception) as info:
        compose_cfg(["trainer.max_steps=abc"])
    assert isinstance(info.value.__cause__, ValidationError)
    with pytest.raises(Exception, match="precision"):
        compose_cfg(["trainer.precision=bf17"])


def test_unknown_group_option_is_rejected():
    with pytest.raises(Exception, match="optimizer/nonsense"):
        compose_cfg(["optimizer=nonsense"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=0", "optimizer.lr"),
        ("optimizer.lr=-1e-3", "optimizer.lr"),
        ("optimizer.betas=[0.9,1.0]", "optimizer.betas"),
        ("optimizer.betas=[-0.1,0.9]", "optimizer.betas"),
        ("optimizer.betas=[0.9]", "optimizer.betas"),
        ("optimizer.eps=0", "optimizer.eps"),
        ("trainer.grad_accum_steps=0", "grad_accum_steps"),
        ("trainer.micro_batch_size=0", "micro_batch_size"),
        ("data.seq_len=256", "larger than the model allows"),
        ("model.n_head=3", "divisible"),
        ("schedule.min_lr_ratio=1.5", "min_lr_ratio"),
        ("trainer.grad_clip=-1", "grad_clip"),
        ("model.dropout=1.0", "dropout"),
        ("data=text", "data.path"),
    ],
)
def test_bad_values_fail_with_a_message(override, message):
    with pytest.raises(ConfigError, match=message):
        to_typed(compose_cfg([override]))


def test_a_yaml_option_with_a_misspelt_key_is_rejected(tmp_path):
    """User-added options are checked against the group's schema too."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "typo.yaml").write_text("defaults:\n  - /model_schema@_here_\n  - _self_\nn_layr: 3\n")
    with pytest.raises(Exception) as info:
        compose_cfg(["model=typo", f"hydra.searchpath=[file://{tmp_path}]"])
    assert "n_layr" in str(info.value) + str(info.value.__cause__)
