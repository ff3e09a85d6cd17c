"""Tokenizers: byte, char (vocabulary from the corpus), BPE (trained with HF `tokenizers`) and any
pretrained tokenizer through transformers' AutoTokenizer.

Every tokenizer has the same small surface: `encode_batch(texts) -> list[np.ndarray]`, `decode(ids)`,
`vocab_size`, `eot_id` (the id put between documents, or None), `identity` (a string that changes
whenever the mapping from text to ids changes: it keys the token cache and guards resume), and
`save(dir)` / `load_tokenizer(dir)` so that every checkpoint carries the tokenizer it was trained with.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from trainer.config import TokenizerConfig
from trainer.data.shards import atomic_dir
from trainer.errors import ConfigError, hub_unreachable

EOT = "<|endoftext|>"


def _digest(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


class ByteTokenizer:
    """UTF-8 bytes: 256 ids, identical everywhere."""

    vocab_size = 256
    eot_id = None
    identity = "byte"

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        _write_spec(directory, {"kind": "byte"})


class CharTokenizer:
    """One id per distinct character, in code-point order."""

    eot_id = None

    def __init__(self, chars: str):
        self.chars = chars
        self.vocab_size = len(chars)
        self.identity = f"char-{_digest(chars)}"
        self._codepoints = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(sorted(seen)))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        for text in texts:
            cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            ids = np.searchsorted(self._codepoints, cps)
            ids = np.minimum(ids, self.vocab_size - 1)
            bad = self._codepoints[ids] != cps
            if bad.any():
                ch = chr(int(cps[bad][0]))
                raise ValueError(f"character {ch!r} is not in the char tokenizer's vocabulary")
            out.append(ids.astype(np.int64))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids if 0 <= int(i) < self.vocab_size)

    def save(self, directory: Path) -> None:
        _write_spec(directory, {"kind": "char", "chars": self.chars})


class HFTokenizer:
    """Wraps a `tokenizers.Tokenizer` (our trained BPE) or a transformers tokenizer."""

    def __init__(self, kind: str, backend, identity: str, vocab_size: int, eot_id: int | None):
        self.kind, self.backend, self.identity = kind, backend, identity
        self.vocab_size, self.eot_id = vocab_size, eot_id

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        if self.kind == "bpe":
            encodings = self.backend.encode_batch(texts, add_special_tokens=False)
            return [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        ids = self.backend(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [np.asarray(i, dtype=np.int64) for i in ids]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids])

    def save(self, directory: Path) -> None:
        if self.kind == "bpe":
            _write_spec(directory, {"kind": "bpe", "tokenizer": self.backend.to_str()})
        else:
            self.backend.save_pretrained(str(directory / "hf"))
            _write_spec(directory, {"kind": "hf", "identity": self.identity})


def train_bpe(texts: Callable[[], Iterable[str]], n_texts: int, vocab_size: int) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation) on the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(texts(), trainer=trainer, length=n_texts)
    return _bpe_from_backend(tok)


def _bpe_from_backend(tok) -> HFTokenizer:
    return HFTokenizer("bpe", tok, f"bpe-{_digest(tok.to_str())}", tok.get_vocab_size(), tok.token_to_id(EOT))


def load_hf_tokenizer(name: str) -> HFTokenizer:
    """transformers.AutoTokenizer by hub id or local directory, with one clear line when unavailable."""
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, ImportError) as e:
        raise ConfigError(
            f"tokenizer.name={name!r} is not available offline: it is not in the local Hugging Face cache "
            f"and {hub_unreachable()} ({type(e).__name__}). Download it once with network access, or set "
            f"tokenizer.name to a local directory holding tokenizer files"
        ) from None
    if hasattr(tok, "backend_tokenizer"):
        identity = f"hf-{_digest(tok.backend_tokenizer.to_str())}"
    else:
        identity = f"hf-{_digest(json.dumps(tok.get_vocab(), sort_keys=True))}"
    return HFTokenizer("hf", tok, identity, len(tok), tok.eos_token_id)


def _write_spec(directory: Path, spec: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(spec))


def load_tokenizer(directory: str | Path):
    """Rebuild a tokenizer written by `save` (each checkpoint holds one)."""
    directory = Path(directory)
    spec = json.loads((directory / "tokenizer.json").read_text())
    kind = spec["kind"]
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "bpe":
        from tokenizers import Tokenizer

        return _bpe_from_backend(Tokenizer.from_str(spec["tokenizer"]))
    if kind == "hf":
        tok = load_hf_tokenizer(str(directory / "hf"))
        tok.identity = spec["identity"]
        return tok
    raise ValueError(f"unknown tokenizer kind {kind!r} in {directory}")


def build_tokenizer(cfg: TokenizerConfig, corpus, cache_dir: Path):
    """Byte and HF tokenizers need no corpus; char and BPE are built from it once and cached.

    `corpus` is a Corpus or anything with `texts()`, `n_texts` and `fingerprint` (trainer/data/hf.py)."""
    if cfg.kind == "byte":
        return ByteTokenizer()
    if cfg.kind == "hf":
        return load_hf_tokenizer(cfg.name)
    suffix = f"-{cfg.vocab_size}" if cfg.kind == "bpe" else ""
    saved = cache_dir / "tokenizers" / f"{cfg.kind}{suffix}-{corpus.fingerprint}"
    if (saved / "tokenizer.json").exists():
        return load_tokenizer(saved)
    if cfg.kind == "char":
        tok = CharTokenizer.from_texts(corpus.texts())
    else:
        tok = train_bpe(corpus.texts, corpus.n_texts, cfg.vocab_size)
    with atomic_dir(saved) as tmp:
        tok.save(tmp)
    return tok
