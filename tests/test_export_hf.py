"""scripts/export_hf.py and models/hf.py: an exported checkpoint loads in transformers (offline) and computes
the same logits as ours (1e-5, fp32, CPU), random and trained, GPT-2 and Llama style, whole and sharded;
transformers' greedy generate gives the same tokens (and text) as ours; tokenizers survive; what has no
transformers class is refused in one line naming the nearest that exports."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_cfg, make_corpus, tiny_overrides
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.hf import export_model, style_of
from models.minigpt import GPTConfig, MiniGPT
from trainer import checkpoint as ckpt_io
from trainer.data.tokenizers import CharTokenizer, load_tokenizer
from trainer.entry.run import run


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_hf, sample = script("export_hf"), script("sample")

LLAMA = {"norm": "rmsnorm", "mlp": "swiglu", "pos_emb": "rope", "bias": False}
RANDOM = {
    "gpt2": ({}, "GPT2LMHeadModel"),
    "gpt2_untied_relu2_nobias": ({"tie_embeddings": False, "mlp": "relu2", "bias": False}, "GPT2LMHeadModel"),
    "llama": ({**LLAMA, "mlp_multiple_of": 16}, "LlamaForCausalLM"),
    "llama_untied_bias": ({**LLAMA, "bias": True, "tie_embeddings": False, "mlp_hidden": 40}, "LlamaForCausalLM"),
    "qwen3": ({**LLAMA, "qk_norm": True, "rope_theta": 500.0}, "Qwen3ForCausalLM"),
}
TRAINED = {"gpt2": {}, "llama": {"model": "llama-nano", "model.tie_embeddings": "false"}}


def hf_logits(out_dir: Path, idx: torch.Tensor) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(str(out_dir)).eval()
    with torch.no_grad():
        return hf(idx).logits


@pytest.mark.parametrize("case", RANDOM)
def test_random_weights_give_the_same_logits_in_transformers(case, tmp_path):
    kw, hf_class = RANDOM[case]
    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, **kw)).eval()
    with torch.no_grad():  # norms at 1 and biases at 0 would hide a mislaid one
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    assert export_model(model, tmp_path) == hf_class
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        ours, _ = model(idx)
    torch.testing.assert_close(hf_logits(tmp_path, idx), ours, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny trained run of each style (20 steps, byte tokenizer)."""
    tmp = tmp_path_factory.mktemp("export")
    corpus = tmp / "corpus.txt"
    corpus.write_text(make_corpus())
    out = {}
    for style, extra in TRAINED.items():
        overrides = tiny_overrides(tmp, corpus, {"trainer.sample_tokens": 0, **extra})
        run(compose_cfg(overrides), tmp / style)
        out[style] = tmp / style
    return out


@pytest.mark.parametrize("style", TRAINED)
def test_a_trained_run_exports_and_generates_the_same_text(style, runs, tmp_path, capsys):
    out = tmp_path / "hf"
    export_hf.main([str(runs[style]), str(out)])
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    model = ckpt_io.load_model(ckpt_io.find_checkpoint(str(runs[style])))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    text = "the old king paints the moon.\n"
    idx = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        ours, _ = model(idx)
    torch.testing.assert_close(hf_logits(out, idx), ours, rtol=0, atol=1e-5)

    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    prompt = tokenizer("the ", return_tensors="pt")
    n = model.config.block_size - prompt.input_ids.size(1)  # within the context, where both read everything
    theirs = hf.generate(**prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)
    assert torch.equal(theirs, model.generate(prompt.input_ids, n, temperature=0))
    capsys.readouterr()
    sample.main([str(runs[style]), "--prompt", "the ", "--max-new-tokens", str(n), "--temperature", "0"])
    assert capsys.readouterr().out == tokenizer.decode(theirs[0]) + "\n"  # our sampler's text


def test_a_sharded_fsdp_checkpoint_exports(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus(20_000))
    extra = {"distributed": "fsdp", "distributed.param_dtype": "fp32", "trainer.max_steps": 4,
             "trainer.ckpt_interval": 4, "trainer.sample_tokens": 0, **TRAINED["llama"]}  # fmt: skip
    with socket.socket() as s:  # a free port for this one-process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    overrides = [*tiny_overrides(tmp_path, corpus, extra), f"hydra.run.dir={tmp_path}/r"]
    cmd = [sys.executable, str(REPO / "train.py"), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = ckpt_io.find_checkpoint(str(tmp_path / "r"))
    assert ckpt_io.is_sharded(ckpt) and not ckpt_io.has_whole_weights(ckpt)
    export_hf.main([str(ckpt), str(tmp_path / "hf")])
    idx = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        ours, _ = ckpt_io.load_model(ckpt)(idx)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", idx), ours, rtol=0, atol=1e-5)


def test_tokenizers_encode_the_same_ids_after_export(tmp_path):
    from tokenizers import Tokenizer

    text = make_corpus(3000)
    chars = CharTokenizer.from_texts([text])
    bpe_run = tmp_path / "bpe"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus())
    extra = {"tokenizer": "bpe", "tokenizer.vocab_size": 300, "trainer.max_steps": 2, "trainer.sample_tokens": 0}
    run(compose_cfg(tiny_overrides(tmp_path, corpus, extra)), bpe_run)
    bpe = load_tokenizer(ckpt_io.find_checkpoint(str(bpe_run)) / "tokenizer")
    assert isinstance(bpe.backend, Tokenizer)
    for i, ours in enumerate((chars, bpe)):
        export_hf.hf_tokenizer(ours).save_pretrained(str(tmp_path / f"t{i}"))
        theirs = AutoTokenizer.from_pretrained(str(tmp_path / f"t{i}"))
        assert theirs.encode(text, add_special_tokens=False) == ours.encode_batch([text])[0].tolist()
        assert theirs.decode(ours.encode_batch([text])[0]) == text
    export_hf.check_round_trip(chars, AutoTokenizer.from_pretrained(str(tmp_path / "t0")))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "t1")).eos_token_id == bpe.eot_id is not None


def test_a_tokenizer_that_cannot_round_trip_is_refused():
    twice = CharTokenizer("aab")  # two ids for one character: one of them never comes back
    with pytest.raises(ValueError, match="(de|en)codes to"):
        export_hf.check_round_trip(twice, export_hf.hf_tokenizer(twice))


@pytest.mark.parametrize(
    "kw, nearest",
    [
        ({"norm": "rmsnorm"}, "GPT2LMHeadModel, trained with model.norm=layernorm"),
        ({**LLAMA, "mlp": "gelu"}, "LlamaForCausalLM, trained with model.mlp=swiglu"),
        ({**LLAMA, "qk_norm": True, "bias": True}, "LlamaForCausalLM, trained with model.qk_norm=false"),
        ({**LLAMA, "qk_norm": True, "mlp": "relu2"}, "Qwen3ForCausalLM, trained with model.mlp=swiglu"),
        ({"logit_softcap": 30.0}, "GPT2LMHeadModel, trained with model.logit_softcap=0.0"),
    ],
)
def test_a_combination_without_a_transformers_class_names_the_nearest(kw, nearest):
    with pytest.raises(ValueError, match=nearest):
        style_of(GPTConfig(vocab_size=64, **kw))


def test_the_script_refuses_in_one_line(runs, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        export_hf.main([str(runs["gpt2"]), str(taken)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.count("\n") == 0 and "not empty" in err
    assert list(taken.iterdir()) == [taken / "x"]


TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_scores_an_export_offline_as_we_do(runs, tmp_path):
    """lm-evaluation-harness's `hf` model on a two-question local task: its log-likelihood of every choice
    is ours (byte tokenizer: the continuation's bytes after the context's), and so is its accuracy."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    out = tmp_path / "hf"
    export_hf.main([str(runs["llama"]), str(out)])
    docs = [{"question": "the cat sees", "choices": ["the moon.", "a dog.", "qz xv"], "answer": 0},
            {"question": "my friend likes", "choices": ["bread sees", "some bread."], "answer": 1}]  # fmt: skip
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)  # ours alone: fast
    result = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={out},dtype=float32,prefix_token_id=10", tasks=["tiny_mc"],
        task_manager=tasks, device="cpu", batch_size=1, log_samples=True,
    )  # fmt: skip
    model = ckpt_io.load_model(ckpt_io.find_checkpoint(str(runs["llama"])))
    right = 0
    for doc, sample in zip(docs, result["samples"]["tiny_mc"], strict=True):
        theirs = [resp[0][0] for resp in sample["resps"]]
        ours = []
        for choice in doc["choices"]:
            context, continuation = list(doc["question"].encode()), list(f" {choice}".encode())
            with torch.no_grad():
                logits, _ = model(torch.tensor([context + continuation]))
            logp = torch.log_softmax(logits[0, len(context) - 1 : -1].double(), dim=-1)
            ours.append(logp[range(len(continuation)), continuation].sum().item())
        assert theirs == pytest.approx(ours, abs=1e-4)
        right += max(range(len(ours)), key=ours.__getitem__) == doc["answer"]
    assert result["results"]["tiny_mc"]["acc,none"] == right / len(docs)
