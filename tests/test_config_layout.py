"""Each default is written once: in the group's schema (trainer/config.py, models/minigpt.py), not again
in the YAML options that select it. An option sets only what makes it that option."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from models.minigpt import GPTConfig
from trainer.config import GROUP_SCHEMAS, ModelConfig

REPO = Path(__file__).resolve().parents[1]
DISCRIMINATORS = {"kind", "name", "strategy"}  # the key that names the option may repeat its default


def flat(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("group", sorted(GROUP_SCHEMAS))
def test_options_do_not_repeat_their_schema_defaults(group: str) -> None:
    defaults = dict(flat(OmegaConf.to_container(OmegaConf.structured(GROUP_SCHEMAS[group]), enum_to_str=True)))
    repeated = {}
    for option in sorted((REPO / "configs" / group).glob("*.yaml")):
        raw = OmegaConf.to_container(OmegaConf.load(option))
        raw.pop("defaults", None)
        same = [k for k, v in flat(raw) if k in defaults and defaults[k] == v and k not in DISCRIMINATORS]
        if same:
            repeated[option.name] = same
    assert not repeated, f"configs/{group}/ repeats the schema's defaults (delete these keys): {repeated}"


def test_model_fields_are_declared_once() -> None:
    """The trainer's model group extends the model's own config; building copies every field through."""
    assert issubclass(ModelConfig, GPTConfig)
    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=64, block_size=48, dropout=0.1, bias=False, pos_emb="rope")
    built = cfg.architecture(tokenizer_vocab=100)
    assert type(built) is GPTConfig and built.vocab_size == 128  # padded to pad_vocab_multiple=64
    assert {f.name: getattr(built, f.name) for f in fields(GPTConfig) if f.name != "vocab_size"} == {
        f.name: getattr(cfg, f.name) for f in fields(GPTConfig) if f.name != "vocab_size"
    }
