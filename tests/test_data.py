"""Corpus discovery, tokenizers, the token cache, the train/val split and the batch sampler."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from conftest import make_corpus

from trainer.config import DataConfig, TokenizerConfig
from trainer.data.corpus import (
    check_split_sizes,
    find_corpus,
    prepare_tokens,
)
from trainer.data.tokenizers import ByteTokenizer, build_tokenizer, load_hf_tokenizer, load_tokenizer
from trainer.errors import ConfigError

TEXT = "def f(x):\n    return x * 2  # naïve — ünïcode ✓\n"


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    for i in range(6):
        (d / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(make_corpus(5000, seed=i))
    return d


def text_corpus(path) -> object:
    return find_corpus(DataConfig(kind="text", path=str(path)))


def test_stdlib_corpus_is_real_and_large():
    corpus = find_corpus(DataConfig(kind="stdlib"))
    assert len(corpus.files) > 500
    assert corpus.total_bytes > 10_000_000  # tens of MB of Python that nobody here wrote
    assert not any("site-packages" in p.parts for p in corpus.files)
    assert any(p.name == "os.py" for p in corpus.files)


def test_text_corpus_accepts_file_directory_and_glob(corpus_dir):
    assert len(text_corpus(corpus_dir / "doc0.txt").files) == 1
    assert len(text_corpus(corpus_dir).files) == 6
    assert len(text_corpus(f"{corpus_dir}/**/*.txt").files) == 6
    assert len(text_corpus(f"{corpus_dir}/sub/*.txt").files) == 3


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        text_corpus(tmp_path / "nope.txt")
    with pytest.raises(ConfigError, match="no files"):
        text_corpus(f"{tmp_path}/*.nothing")


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_tokenizers_round_trip_and_reload(kind, corpus_dir, tmp_path):
    (corpus_dir / "extra.txt").write_text(TEXT)
    corpus = text_corpus(corpus_dir)
    tok = build_tokenizer(TokenizerConfig(kind=kind, vocab_size=400), corpus, tmp_path / "cache")
    ids = tok.encode_batch([TEXT])[0]
    assert ids.max() < tok.vocab_size
    assert tok.decode(ids) == TEXT
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.identity == tok.identity and again.vocab_size == tok.vocab_size
    assert np.array_equal(again.encode_batch([TEXT])[0], ids)
    if kind == "bpe":
        assert tok.vocab_size <= 400 and tok.eot_id is not None
        assert len(ids) < len(TEXT.encode())  # merges were learned


def test_char_and_bpe_tokenizers_are_built_once_and_reused(corpus_dir, tmp_path):
    corpus = text_corpus(corpus_dir)
    cache = tmp_path / "cache"
    first = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), corpus, cache)
    saved = list((cache / "tokenizers").iterdir())
    assert len(saved) == 1
    mtime = (saved[0] / "tokenizer.json").stat().st_mtime_ns
    second = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), corpus, cache)
    assert second.identity == first.identity
    assert (saved[0] / "tokenizer.json").stat().st_mtime_ns == mtime


def test_hf_tokenizer_from_a_local_directory(corpus_dir, tmp_path):
    from transformers import PreTrainedTokenizerFast

    bpe = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), text_corpus(corpus_dir), tmp_path / "c")
    PreTrainedTokenizerFast(tokenizer_object=bpe.backend, eos_token="<|endoftext|>").save_pretrained(
        tmp_path / "hf_tok"
    )
    tok = load_hf_tokenizer(str(tmp_path / "hf_tok"))
    assert tok.vocab_size == bpe.vocab_size and tok.eot_id == bpe.eot_id
    assert tok.decode(tok.encode_batch([TEXT])[0]) == TEXT


def test_hf_tokenizer_unavailable_offline_is_one_clear_line():
    with pytest.raises(ConfigError, match="not available offline") as info:
        load_hf_tokenizer("surely-not-a-real-org/surely-not-a-tokenizer")
    assert "\n" not in str(info.value)


def test_split_is_deterministic_disjoint_and_complete(corpus_dir, tmp_path):
    corpus = text_corpus(corpus_dir)
    tok = ByteTokenizer()
    splits = prepare_tokens(corpus, tok, tmp_path / "cache", val_fraction=0.1, progress=False)
    all_tokens = np.concatenate([tok.encode_batch([t])[0] for t in corpus.texts()])
    assert len(splits.train) + len(splits.val) == len(all_tokens)
    train, val = splits.train.read(0, len(splits.train)), splits.val.read(0, len(splits.val))
    assert np.array_equal(np.concatenate([train, val]), all_tokens)
    assert abs(len(splits.val) / len(all_tokens) - 0.1) < 0.01
    assert splits.train.dtype == np.uint16
    again = prepare_tokens(text_corpus(corpus_dir), tok, tmp_path / "cache2", 0.1, progress=False)
    assert np.array_equal(again.val.read(0, len(again.val)), val)


def test_cache_is_reused_and_invalidated_by_a_changed_file(corpus_dir, tmp_path):
    cache = tmp_path / "cache"
    prepare_tokens(text_corpus(corpus_dir), ByteTokenizer(), cache, 0.1, progress=False)
    entries = {p.name for p in cache.iterdir()}
    prepare_tokens(text_corpus(corpus_dir), ByteTokenizer(), cache, 0.1, progress=False)
    assert {p.name for p in cache.iterdir()} == entries  # reused
    time.sleep(0.01)
    doc = corpus_dir / "doc0.txt"
    doc.write_text(doc.read_text() + "more text\n")
    os.utime(doc)
    prepare_tokens(text_corpus(corpus_dir), ByteTokenizer(), cache, 0.1, progress=False)
    assert len({p.name for p in cache.iterdir()}) == len(entries) + 1
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp")]


def test_too_short_corpus_is_refused(tmp_path):
    (tmp_path / "short.txt").write_text("too short " * 20)
    splits = prepare_tokens(text_corpus(tmp_path / "short.txt"), ByteTokenizer(), tmp_path / "c", 0.1, False)
    with pytest.raises(ConfigError, match="corpus too short"):
        check_split_sizes(splits, seq_len=64, micro_batch_size=4)
