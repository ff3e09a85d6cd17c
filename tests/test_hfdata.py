"""data=hf without network: local JSON Lines, Parquet and save_to_disk datasets, a hub dataset read
offline from its cache, held-out validation, resumable preparation, the token cap, and each error."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_corpus
from hf_fixtures import make_cached_hub_dataset

from trainer.build import prepare_data
from trainer.data.hf import cache_report, open_source
from trainer.data.hfprepare import prepare_hf
from trainer.entry.cli import compose_config
from trainer.errors import ConfigError

ENV = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def texts(n: int = 240, seed: int = 0) -> list[str]:
    """Distinct documents of uneven length (the number makes each one identifiable)."""
    rng = random.Random(seed)
    return [f"document {i}: " + make_corpus(rng.randint(20, 600), seed=seed * 1000 + i) for i in range(n)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "n": i}) + "\n" for i, t in enumerate(docs)))
    return path


def config(tmp_path: Path, *overrides: str, tokenizer: str = "bpe"):
    tok = ["tokenizer=bpe", "tokenizer.vocab_size=300"] if tokenizer == "bpe" else [f"tokenizer={tokenizer}"]
    return compose_config(["data=hf", f"data.cache_dir={tmp_path / 'cache'}", "data.num_proc=2", *tok, *overrides])


def documents(split, eot: int) -> list[tuple[int, ...]]:
    """A split's token stream cut back into documents at the end-of-text tokens."""
    tokens = split.read(0, len(split)).tolist()
    docs, current = [], []
    for t in tokens:
        if t == eot:
            docs.append(tuple(current))
            current = []
        else:
            current.append(t)
    assert not current, "every document ends with the end-of-text token"
    return docs


def assert_split_by_documents(tokenizer, splits, docs: list[str], val_docs: list[str] | None = None) -> None:
    """Train and val hold each document once, tokenised as the tokenizer alone does, in corpus order."""
    encode = {tuple(tokenizer.encode_batch([t])[0].tolist()): i for i, t in enumerate(docs + (val_docs or []))}
    train = [encode[d] for d in documents(splits.train, tokenizer.eot_id)]
    val = [encode[d] for d in documents(splits.val, tokenizer.eot_id)]
    assert train == sorted(train) and val == sorted(val)
    if val_docs is None:  # a held-out fraction of the same documents
        assert sorted(train + val) == list(range(len(docs)))
        assert 0.1 < len(val) / len(docs) < 0.3  # data.val_fraction=0.2
    else:  # a held-out split
        assert train == list(range(len(docs))) and val == list(range(len(docs), len(docs) + len(val_docs)))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_local_files_are_tokenised_into_disjoint_train_and_val_documents(tmp_path, fmt):
    docs = texts()
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "docs.parquet"
        pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), path)
    cfg = config(tmp_path, f"data.data_files={path}", "data.val_fraction=0.2")
    tokenizer, splits = prepare_data(cfg, progress=False)
    assert_split_by_documents(tokenizer, splits, docs)
    assert splits.meta["train_documents"] + splits.meta["val_documents"] == len(docs)
    again = prepare_data(cfg, progress=False)[1]  # the cache is reused as it is
    assert again.train.directory == splits.train.directory


def test_a_save_to_disk_dataset_with_a_held_out_split(tmp_path):
    from datasets import Dataset, DatasetDict

    train, val = texts(200, seed=1), texts(30, seed=2)
    saved = DatasetDict({"train": Dataset.from_dict({"body": train}), "validation": Dataset.from_dict({"body": val})})
    saved.save_to_disk(tmp_path / "saved")
    cfg = config(tmp_path, f"data.name={tmp_path / 'saved'}", "data.val_split=validation", "data.text_field=body")
    tokenizer, splits = prepare_data(cfg, progress=False)
    assert_split_by_documents(tokenizer, splits, train, val)


def test_max_tokens_keeps_exactly_that_many(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", texts())
    cfg = config(tmp_path, f"data.data_files={path}", "data.max_tokens=5000", "data.shard_tokens=1000")
    _, splits = prepare_data(cfg, progress=False)
    assert len(splits.train) + len(splits.val) == 5000
    assert [n for _, n in splits.train.index["shards"]][:-1] == [1000] * (len(splits.train.shards) - 1)


def test_a_vocabulary_over_65536_is_stored_as_uint32(tmp_path):
    class Wide:  # ids above uint16's range
        vocab_size, eot_id, identity = 100_000, 99_999, "wide-test"

        def encode_batch(self, batch):
            return [np.frombuffer(t.encode(), dtype=np.uint8).astype(np.int64) + 70_000 for t in batch]

    docs = texts(20)
    cfg = config(tmp_path, f"data.data_files={write_jsonl(tmp_path / 'd.jsonl', docs)}", tokenizer="byte")
    splits = prepare_hf(open_source(cfg.data), Wide(), tmp_path / "cache", progress=False)
    assert splits.train.dtype == np.uint32
    stream = np.concatenate([splits.train.read(0, len(splits.train)), splits.val.read(0, len(splits.val))])
    assert stream.max() == 99_999 and stream[stream != 99_999].min() >= 70_000
    assert len(stream) == sum(len(t.encode()) + 1 for t in docs)


def test_an_interrupted_preparation_resumes_and_never_looks_complete(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", texts(300))
    cfg = config(tmp_path, f"data.data_files={path}", "data.val_fraction=0.2", "data.shard_tokens=2000")
    source = open_source(cfg.data)
    tokenizer, reference = prepare_data(cfg, progress=False)
    reference_tokens = reference.train.read(0, len(reference.train))
    cache = tmp_path / "cache2"

    def crash_after_three(job, docs):
        if docs >= 3 * 32:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_hf(source, tokenizer, cache, progress=False, chunk_docs=32, on_chunk=crash_after_three)
    assert not list(cache.glob("*/meta.json")) and not list(cache.glob("hf-*[!l]"))  # only the .partial
    partial = next(cache.glob("*.partial"))
    open_shard = sorted((partial / "train").glob("shard_*.bin"))[-1]
    with open(open_shard, "ab") as f:  # a chunk that was being written when the process died
        f.write(b"\x07\x00" * 999)
    chunks = []
    splits = prepare_hf(source, tokenizer, cache, progress=False, chunk_docs=32, on_chunk=lambda j, d: chunks.append(d))
    assert chunks[0] == 4 * 32 and len(chunks) == 7  # carried on after the three saved chunks
    assert not partial.exists() and (splits.train.directory.parent / "meta.json").exists()
    assert np.array_equal(splits.train.read(0, len(splits.train)), reference_tokens)
    assert np.array_equal(splits.val.read(0, len(splits.val)), reference.val.read(0, len(reference.val)))


def test_a_hub_dataset_resolves_offline_from_its_local_cache(tmp_path):
    """What a user has after downloading a hub dataset once: prepare_data.py then works with no network,
    streamed or not, and gives the same tokens."""
    hf_cache = tmp_path / "hf_datasets"
    train, val = texts(120, seed=3), texts(20, seed=4)
    rows = {"train": [{"text": t} for t in train], "validation": [{"text": t} for t in val]}
    make_cached_hub_dataset(hf_cache, "acme/tiny-docs", rows, "sample")
    env = ENV | {"HF_DATASETS_CACHE": str(hf_cache)}
    dirs = []
    for streaming in ("false", "true"):
        args = ["data=hf", "data.name=acme/tiny-docs", "data.subset=sample", "data.val_split=validation",
                f"data.streaming={streaming}", f"data.cache_dir={tmp_path / 'cache'}", "tokenizer=byte"]  # fmt: skip
        proc = subprocess.run([sys.executable, "scripts/prepare_data.py", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"datasets cache {hf_cache}" in proc.stderr  # where the cache is, and its size
        train_line = next(line for line in proc.stdout.splitlines() if line.startswith("train:"))
        assert f"{sum(len(t.encode()) for t in train):,} tokens" in train_line  # byte tokens, no end-of-text
        dirs.append(Path(train_line.split(" at ")[-1]))
    a, b = (np.fromfile(d / "shard_00000.bin", dtype=np.uint16) for d in dirs)
    assert dirs[0] != dirs[1] and np.array_equal(a, b)
    assert bytes(a.astype(np.uint8)) == "".join(train).encode()


@pytest.fixture
def hub_cache(tmp_path):
    hf_cache = tmp_path / "hf_datasets"
    make_cached_hub_dataset(hf_cache, "acme/tiny-docs", {"train": [{"text": "a b"}]}, "sample")
    return hf_cache


ERRORS = {
    "not in the cache, offline": (["data.name=acme/unknown-docs"], "set HF_HUB_OFFLINE=1"),
    "unknown subset": (["data.name=acme/tiny-docs", "data.subset=nope"], "data.subset='nope'"),
    "unknown split": (["data.name=acme/tiny-docs", "data.subset=sample", "data.split=test"], "data.split='test'"),
    "missing text field": (["data.name=acme/tiny-docs", "data.subset=sample", "data.text_field=body"],
                           "has no column data.text_field='body'"),
    "missing data files": (["data.data_files=/no/such/dir/*.jsonl"], "matches no files"),
    "unknown file format": (["data.data_files={tmp}/docs.xyz"], "set data.data_format"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_data_fails_before_training_with_one_line(tmp_path, hub_cache, case):
    args, needle = ERRORS[case]
    (tmp_path / "docs.xyz").write_text("some text")
    args = [a.format(tmp=tmp_path) for a in args]
    cmd = [
        sys.executable,
        "train.py",
        "data=hf",
        *args,
        f"data.cache_dir={tmp_path / 'c'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV | {"HF_DATASETS_CACHE": str(hub_cache)}, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("Using the latest")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and needle in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # found before a run directory was made


def test_an_empty_split_is_refused(tmp_path):
    (tmp_path / "header_only.csv").write_text("text\n")
    for streaming in ("false", "true"):
        with pytest.raises(ConfigError, match="split 'train' is empty"):
            open_source(
                config(tmp_path, f"data.data_files={tmp_path / 'header_only.csv'}", f"data.streaming={streaming}").data
            )
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match="the files are empty"):
        open_source(config(tmp_path, f"data.data_files={tmp_path / 'empty.jsonl'}").data)


def test_a_dataset_the_hub_does_not_know_says_to_check_the_name_or_log_in(tmp_path, monkeypatch):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def not_found(*args, **kwargs):  # what load_dataset raises online for a missing or gated dataset
        raise DatasetNotFoundError("Dataset 'acme/missing' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", not_found)
    with pytest.raises(ConfigError, match="log in") as info:
        open_source(config(tmp_path, "data.name=acme/missing").data)
    assert "\n" not in str(info.value) and "data.data_files" in str(info.value)


def test_cache_report_names_each_cache_and_its_size(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard_00000.bin").write_bytes(b"\0" * 3_000_000)
    report = cache_report(tmp_path / "shards")
    assert "datasets cache" in report and "hub cache" in report
    assert f"token shards {tmp_path / 'shards'} (3.0 MB)" in report


def test_the_gpt2_presets_hold_the_llm_c_recipe_and_fail_offline_with_one_line(tmp_path):
    edu = compose_config(["+experiment=gpt2_124m_fineweb_edu"])
    muon = compose_config(["+experiment=gpt2_124m_muon"])
    for cfg in (edu, muon):
        t = cfg.trainer
        assert (cfg.data.kind, cfg.data.name, cfg.data.subset, cfg.tokenizer.name) == (
            "hf", "HuggingFaceFW/fineweb-edu", "sample-10BT", "gpt2")  # fmt: skip
        assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size) == (12, 768, 1024)
        assert t.micro_batch_size * t.grad_accum_steps * cfg.model.block_size == 524_288  # one GPU
        assert (t.max_steps, t.precision.value, t.compile, t.grad_clip) == (18_865, "bf16", True, 1.0)
        assert (cfg.schedule.name, cfg.schedule.warmup_steps, cfg.schedule.min_lr_ratio) == ("cosine", 700, 0.0)
    assert (edu.optimizer.name, edu.optimizer.lr, edu.optimizer.weight_decay, edu.optimizer.betas) == (
        "adamw", 6e-4, 0.1, [0.9, 0.95])  # fmt: skip
    assert (muon.optimizer.name, muon.optimizer.lr, muon.optimizer.adamw_lr) == ("muon", 0.02, 6e-4)
    cmd = [sys.executable, "train.py", "+experiment=gpt2_124m_fineweb_edu", f"hydra.run.dir={tmp_path}/r"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "HuggingFaceFW/fineweb-edu" in lines[0], proc.stderr


def test_bench_data_prints_one_json_line_per_result(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus(40_000))
    args = ["data=text", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "tokenizer.vocab_size=300",
            "--docs", "5", "--repeats", "1", "--loader-tokens", "300000", "--shard-tokens", "100000", "--batches", "5",
            "--batch-size", "4", "--seq-len", "64"]  # fmt: skip
    proc = subprocess.run([sys.executable, "scripts/bench_data.py", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]  # (BPE training's bar: blank)
    assert [(r["bench"], r["impl"]) for r in records] == [
        ("tokenize", "baseline_single_process"), ("tokenize", "prepare_num_proc_1"), ("tokenize", "prepare_num_proc_2"),
        ("load", "baseline_numpy_one_shard"), ("load", "sampler_across_shards"),
    ]  # fmt: skip
    assert len({r["tokens"] for r in records[:3]}) == 1 and all(r["tokens_per_s"] > 0 for r in records)
    assert records[-1]["shards"] == 3 and records[-1]["vs_gpt2_h100_step"] > 0
