"""model.init_from: a run starts from a local transformers GPT-2, Llama or Qwen3 directory (a tiny random
model saved by transformers here): the architecture and the tokenizer come from it, the logits match
transformers' own, training continues; mismatches and files that could run code are refused in one line."""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import pytest
import torch
import transformers
from conftest import REPO, compose_cfg, make_corpus, tiny_overrides

from trainer import checkpoint as ckpt_io
from trainer.build import setup_run
from trainer.config import to_typed
from trainer.data.tokenizers import ByteTokenizer
from trainer.entry.run import run
from trainer.errors import ConfigError

spec = importlib.util.spec_from_file_location("export_hf", REPO / "scripts" / "export_hf.py")
export_hf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export_hf)

SHAPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 32,
         "vocab_size": 256, "intermediate_size": 48, "rms_norm_eps": 1e-5}  # fmt: skip
MODELS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, rope_theta=500.0)),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SHAPE, head_dim=16, num_key_value_heads=2,
                                                                            tie_word_embeddings=True)),
}  # fmt: skip


def save_hf(kind: str, directory: Path, **changes) -> transformers.PreTrainedModel:
    """A tiny random transformers model of `kind` with our byte tokenizer, saved by transformers."""
    torch.manual_seed(0)
    model = MODELS[kind]()
    with torch.no_grad():  # norms at 1 and biases at 0 would hide a mislaid one
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    for key, value in changes.items():
        setattr(model.config, key, value)
    model.save_pretrained(str(directory))
    export_hf.hf_tokenizer(ByteTokenizer()).save_pretrained(str(directory))
    return model.eval()


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(make_corpus(30_000))
    return path


@pytest.mark.parametrize("kind", MODELS)
def test_a_run_starts_from_a_transformers_directory_and_trains_on(kind, tmp_path, corpus):
    hf = save_hf(kind, tmp_path / "hf")
    overrides = tiny_overrides(tmp_path, corpus, {"model.init_from": str(tmp_path / "hf"), "trainer.sample_tokens": 0})
    cfg = to_typed(compose_cfg(overrides))
    assert (cfg.tokenizer.kind, cfg.tokenizer.name) == ("hf", str(tmp_path / "hf"))
    assert cfg.model.norm == ("layernorm" if kind == "gpt2" else "rmsnorm")
    assert cfg.model.qk_norm == (kind == "qwen3") and cfg.model.vocab_size == 256
    built = setup_run(cfg, tmp_path / "built")
    idx = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        ours, _ = built.model.eval()(idx)
        torch.testing.assert_close(ours, hf(idx).logits, rtol=0, atol=1e-5)
    run(compose_cfg(overrides), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val/loss"] for r in records if "val/loss" in r]
    assert val[-1] < val[0] - 0.5, val  # it learns from where the transformers model stood
    # and goes back out: the trained run exports as the same class, with the directory's tokenizer
    export_hf.main([str(tmp_path / "run"), str(tmp_path / "out")])
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert type(again) is type(hf)
    with torch.no_grad():
        trained, _ = ckpt_io.load_model(ckpt_io.find_checkpoint(str(tmp_path / "run")))(idx)
        torch.testing.assert_close(again(idx).logits, trained, rtol=0, atol=1e-5)
    text = "the cat sees the moon."
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out")).encode(text) == list(text.encode())


def refusal(tmp_path: Path, corpus: Path, **extra) -> str:
    with pytest.raises(ConfigError) as e:
        to_typed(compose_cfg(tiny_overrides(tmp_path, corpus, {"model.init_from": str(tmp_path / "hf"), **extra})))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_settings_that_contradict_the_directory_are_named(tmp_path, corpus):
    save_hf("llama", tmp_path / "hf")
    assert "model.n_layer=3 (it has 2)" in refusal(tmp_path, corpus, **{"model.n_layer": 3})
    assert "model.norm=layernorm" not in refusal(tmp_path, corpus, **{"model.n_layer": 3})  # a default: taken
    assert "model.logit_softcap=30.0 (it has 0.0)" in refusal(tmp_path, corpus, **{"model.logit_softcap": 30})
    assert "drop tokenizer=bpe" in refusal(tmp_path, corpus, tokenizer="bpe")


@pytest.mark.parametrize(
    "kind, changes, message",
    [
        ("llama", {"num_key_value_heads": 1}, "grouped-query attention"),
        ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "RoPE scaling"),
        ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ("gpt2", {"activation_function": "gelu"}, "activation_function='gelu'"),
        ("llama", {"auto_map": {"AutoModelForCausalLM": "x.Model"}}, "asks for its own code"),
    ],
)
def test_what_minigpt_cannot_be_is_refused(kind, changes, message, tmp_path, corpus):
    save_hf(kind, tmp_path / "hf", **changes)
    assert message in refusal(tmp_path, corpus)


class Trap:
    """Unpickling this writes a file: proof that a pickle was loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def test_pickled_weights_are_refused_without_being_read(tmp_path, corpus):
    save_hf("gpt2", tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(pickle.dumps(Trap(str(marker))))
    cfg = to_typed(compose_cfg(tiny_overrides(tmp_path, corpus, {"model.init_from": str(tmp_path / "hf")})))
    with pytest.raises(ConfigError, match="only pytorch_model.bin, whose loading can run code"):
        setup_run(cfg, tmp_path / "run")
    assert not marker.exists()


def test_a_directory_without_a_config_is_refused(tmp_path, corpus):
    (tmp_path / "hf").mkdir()
    assert "has no config.json" in refusal(tmp_path, corpus)


def test_a_home_relative_path_and_a_config_missing_a_field(tmp_path, corpus, monkeypatch):
    save_hf("llama", tmp_path / "hf")
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = to_typed(compose_cfg(tiny_overrides(tmp_path, corpus, {"model.init_from": '"~/hf"'})))  # quoted for Hydra
    assert cfg.tokenizer.name == cfg.model.init_from == str(tmp_path / "hf")  # the tokenizer's loader needs it so
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config["num_hidden_layers"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert "config.json has no 'num_hidden_layers'" in refusal(tmp_path, corpus)
