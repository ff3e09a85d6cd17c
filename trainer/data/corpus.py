"""Local text corpora -> tokenizer -> sharded token cache.

The corpus is a list of text files: the running Python's standard-library sources (`data=stdlib`,
no download) or the user's files (`data=text`). Documents are put in a fixed pseudo-random order,
tokenised once with an end-of-text id between them where the tokenizer has one, and written as
sharded uint16/uint32 token files (trainer/data/shards.py) keyed by the corpus and tokenizer. The last
`val_fraction` of the tokens is the validation split. Hugging Face datasets (`data=hf`) take the
same route through trainer/data/hf.py; batches are drawn by trainer/data/sampling.py.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from trainer.config import DataConfig
from trainer.data.shards import ShardWriter, TokenShards, atomic_dir, token_dtype
from trainer.errors import ConfigError

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: sharded token files (trainer/data/shards.py)
BINARY_PROBE = 8192  # a NUL byte in a file's first 8 KiB: not text


def decode(raw: bytes) -> tuple[str, int]:
    """The text (invalid UTF-8 replaced by U+FFFD, as before) and how many bytes were replaced."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        escaped = raw.decode("utf-8", errors="surrogateescape")  # one lone surrogate per invalid byte
        bad = sum(1 for ch in escaped if "\udc80" <= ch <= "\udcff")
        return raw.decode("utf-8", errors="replace"), bad


@dataclass
class Corpus:
    kind: str
    files: list[Path]
    fingerprint: str  # changes when any file is added, removed, resized or touched

    @property
    def n_texts(self) -> int:
        return len(self.files)

    def texts(self) -> Iterator[str]:
        """Each file's text; at the end, one line saying how many bytes were not UTF-8 (replaced by U+FFFD)."""
        replaced: dict[Path, int] = {}  # file -> bytes replaced
        for path in self.files:
            try:
                data = path.read_bytes()
            except OSError as e:  # readable when the corpus was found, not now
                raise ConfigError(
                    f"data.path: {path} cannot be read ({e.strerror}): fix its access or leave it out"
                ) from None
            text, bad = decode(data)
            if bad:
                replaced[path] = bad
            yield text
        if replaced:
            level = logging.WARNING if self.kind == "text" else logging.INFO  # stdlib: a few latin-1 test files
            log.log(level, "%d bytes in %d file(s) were not UTF-8 and were replaced by U+FFFD (first: %s)",
                    sum(replaced.values()), len(replaced), next(iter(replaced)))  # fmt: skip

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def find_corpus(cfg: DataConfig) -> Corpus:
    if cfg.kind == "stdlib":
        files = _stdlib_sources()
    else:
        files = _text_files(cfg.path)
    if not files:
        raise ConfigError(f"no corpus files found for data.kind={cfg.kind} data.path={cfg.path!r}")
    # A fixed pseudo-random document order, so the held-out tail is a mix of documents.
    files.sort(key=lambda p: hashlib.sha256(str(p).encode()).hexdigest())
    h = hashlib.sha256(cfg.kind.encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return Corpus(cfg.kind, files, h.hexdigest()[:16])


def _stdlib_sources() -> list[Path]:
    """Every .py file of the running interpreter's standard library (third-party packages pruned)."""
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(sysconfig.get_paths()["stdlib"]):
        dirnames[:] = [d for d in dirnames if d not in skip]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return [p for p in files if p.is_file()]


def _text_files(path: str | None) -> list[Path]:
    if not path:
        raise ConfigError("data=text needs data.path=FILE, DIRECTORY or GLOB")
    expanded = os.path.expanduser(path)
    if any(ch in expanded for ch in "*?["):
        files = [Path(p) for p in glob.glob(expanded, recursive=True)]
    elif os.path.isdir(expanded):  # hidden files and everything under hidden directories (.git/) are skipped
        root = Path(expanded)
        files = [p for p in root.rglob("*") if not any(s.startswith(".") for s in p.relative_to(root).parts)]
    elif os.path.isfile(expanded):
        files = [Path(expanded)]
    else:
        raise ConfigError(f"data.path={path!r} does not exist: point it at a text file, a directory or a glob")
    files = [p.resolve() for p in files if p.is_file()]
    if not files:
        raise ConfigError(f"data.path={path!r} holds no files: point it at a text file, a directory or a glob")
    for p in files:
        try:
            with open(p, "rb") as f:
                head = f.read(BINARY_PROBE)
        except OSError as e:
            raise ConfigError(f"data.path: {p} cannot be read ({e.strerror}): fix its access or leave it out") from None
        if b"\0" in head:
            raise ConfigError(
                f"data.path: {p} is not text (a NUL byte in its first {BINARY_PROBE // 1024} KiB): leave it out, "
                f"e.g. with a glob such as 'data.path={path.rstrip('/')}/**/*.txt'"
            )
    return files


@dataclass
class TokenSplits:
    train: TokenShards  # memory-mapped sharded token files (trainer/data/shards.py)
    val: TokenShards
    meta: dict


def open_splits(target: Path) -> TokenSplits:
    meta = json.loads((target / "meta.json").read_text())
    return TokenSplits(TokenShards(target / "train"), TokenShards(target / "val"), meta)


def prepare_tokens(
    corpus: Corpus,
    tokenizer,
    cache_dir: Path,
    val_fraction: float,
    progress: bool = True,
    shard_tokens: int = 100_000_000,
) -> TokenSplits:
    """Tokenise the corpus once; later runs with the same corpus and tokenizer memory-map the cache."""
    key = hashlib.sha256(
        f"{CACHE_FORMAT}|{corpus.fingerprint}|{tokenizer.identity}|{val_fraction}".encode()
    ).hexdigest()[:16]
    target = cache_dir / f"tokens-{key}"
    if not (target / "meta.json").exists():
        tokens = _tokenize(corpus, tokenizer, progress)
        n_val = max(1, int(len(tokens) * val_fraction))
        dtype = token_dtype(tokenizer.vocab_size)
        with atomic_dir(target) as tmp:
            for split, part in (("train", tokens[:-n_val]), ("val", tokens[-n_val:])):
                writer = ShardWriter(tmp / split, dtype, shard_tokens)
                writer.write(part)
                writer.finish(tokenizer=tokenizer.identity)
            meta = {
                "format": CACHE_FORMAT, "source": f"{corpus.kind}:{corpus.fingerprint}",
                "tokenizer": tokenizer.identity,
                "vocab_size": tokenizer.vocab_size, "dtype": dtype.name, "documents": len(corpus.files),
                "train_tokens": len(tokens) - n_val, "val_tokens": n_val,
            }  # fmt: skip
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return open_splits(target)


def _tokenize(corpus: Corpus, tokenizer, progress: bool, batch_docs: int = 64) -> np.ndarray:
    parts: list[np.ndarray] = []
    eot = None if tokenizer.eot_id is None else np.array([tokenizer.eot_id], dtype=np.int64)
    bar = tqdm(total=corpus.total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    texts = corpus.texts()
    for start in range(0, len(corpus.files), batch_docs):
        batch = [next(texts) for _ in corpus.files[start : start + batch_docs]]
        for ids in tokenizer.encode_batch(batch):
            parts.append(ids)
            if eot is not None:
                parts.append(eot)
        bar.update(sum(p.stat().st_size for p in corpus.files[start : start + batch_docs]))
    bar.close()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def check_split_sizes(splits: TokenSplits, seq_len: int, micro_batch_size: int) -> None:
    """Fail before training when the corpus cannot fill one batch."""
    need_train = micro_batch_size * seq_len + 1
    if len(splits.train) < need_train or len(splits.val) < seq_len + 1:
        raise ConfigError(
            f"corpus too short: {len(splits.train)} train and {len(splits.val)} val tokens, but one batch "
            f"needs {need_train} train and {seq_len + 1} val tokens; use more text or lower "
            f"model.block_size / data.seq_len / trainer.micro_batch_size"
        )
