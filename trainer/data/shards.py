"""Sharded token files: how a tokenised split is written and read.

A split is a directory of raw token files, `shard_00000.bin`, `shard_00001.bin`, ..., each at most
`shard_tokens` tokens (uint16 when the vocabulary fits, uint32 otherwise), and an `index.json` that
lists the shard sizes. Writing is resumable: `ShardWriter.state()` is small enough to save after
every chunk, and a writer built from it truncates the open shard back to the saved length, so a
crash between saves loses only unsaved tokens, never consistency. Reading memory-maps the shards:
memory stays flat whatever the split's size, and a read may span shard boundaries.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

INDEX = "index.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.bin"


class ShardWriter:
    """Append token arrays to a split directory, starting a new shard whenever one is full."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int, state: dict | None = None):
        if shard_tokens < 1:
            raise ValueError("shard_tokens must be positive")
        self.directory, self.dtype, self.shard_tokens = Path(directory), np.dtype(dtype), shard_tokens
        self.directory.mkdir(parents=True, exist_ok=True)
        state = state or {"sizes": [], "documents": 0}
        self.sizes: list[int] = list(state["sizes"])  # tokens in each shard; the last one may be open
        self.documents: int = state["documents"]
        # Drop anything written after the saved state (an interrupted chunk) and any later shard.
        for i, size in enumerate(self.sizes):
            os.truncate(self.directory / shard_name(i), size * self.dtype.itemsize)
        for later in sorted(self.directory.glob("shard_*.bin"))[len(self.sizes) :]:
            later.unlink()
        self._file = None

    @property
    def tokens(self) -> int:
        return sum(self.sizes)

    def write(self, tokens: np.ndarray, documents: int = 0) -> None:
        """Append tokens (any integer array); `documents` counts the documents they complete."""
        tokens = np.asarray(tokens)
        if tokens.size and int(tokens.max()) > np.iinfo(self.dtype).max:
            raise ValueError(f"token id {int(tokens.max())} does not fit the shard dtype {self.dtype.name}")
        tokens = tokens.astype(self.dtype, copy=False)
        while tokens.size:
            if not self.sizes or self.sizes[-1] == self.shard_tokens:
                self._close_file()
                self.sizes.append(0)
            if self._file is None:
                self._file = open(self.directory / shard_name(len(self.sizes) - 1), "ab")
            room = self.shard_tokens - self.sizes[-1]
            head, tokens = tokens[:room], tokens[room:]
            head.tofile(self._file)
            self.sizes[-1] += len(head)
        self.documents += documents

    def state(self) -> dict:
        """Flush to disk and return what a writer needs to carry on from here."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        return {"sizes": list(self.sizes), "documents": self.documents}

    def finish(self, **meta) -> dict:
        """Flush, write the split's index.json (the mark of a complete split) and return it."""
        state = self.state()
        self._close_file()
        index = {
            "dtype": self.dtype.name, "shard_tokens": self.shard_tokens, "tokens": sum(state["sizes"]),
            "documents": state["documents"], "shards": [[shard_name(i), n] for i, n in enumerate(state["sizes"])],
            **meta,
        }  # fmt: skip
        (self.directory / INDEX).write_text(json.dumps(index, indent=1))
        return index

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TokenShards:
    """A split's shards as one read-only token sequence, memory-mapped."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.index = json.loads((self.directory / INDEX).read_text())
        self.dtype = np.dtype(self.index["dtype"])
        shards = [(name, n) for name, n in self.index["shards"] if n > 0]  # an empty file cannot be mapped
        self.shards = [np.memmap(self.directory / name, dtype=self.dtype, mode="r", shape=(n,)) for name, n in shards]
        self.starts = np.cumsum([0] + [n for _, n in shards])  # global offset of each shard

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), joined across shards."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"read [{start}, {start + length}) outside a split of {len(self)} tokens")
        if length == 0:
            return np.empty(0, dtype=self.dtype)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        offset = start - int(self.starts[i])
        first = self.shards[i][offset : offset + length]
        if len(first) == length:
            return first
        parts, need = [first], length - len(first)
        while need:
            i += 1
            parts.append(self.shards[i][:need])
            need -= len(parts[-1])
        return np.concatenate(parts)

    def gather(self, starts: np.ndarray, length: int) -> np.ndarray:
        """A (len(starts), length) int64 array of the windows beginning at `starts`."""
        starts = np.asarray(starts, dtype=np.int64)
        out = np.empty((len(starts), length), dtype=np.int64)
        shard = np.searchsorted(self.starts, starts, side="right") - 1
        local = starts - self.starts[shard]
        inside = starts + length <= self.starts[np.minimum(shard + 1, len(self.shards))]
        offsets = np.arange(length)
        for i in np.unique(shard[inside]):  # one fancy-indexed read per shard
            rows = np.flatnonzero(inside & (shard == i))
            out[rows] = self.shards[i][local[rows, None] + offsets]
        for row in np.flatnonzero(~inside):  # windows that run into the next shard
            out[row] = self.read(int(starts[row]), length)
        return out


class atomic_dir:
    """Write into a temporary sibling directory, then rename it into place: never half a cache."""

    def __init__(self, target: Path):
        self.target = target

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.target.name}-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self.target.exists():
            os.replace(self.tmp, self.target)
        shutil.rmtree(self.tmp, ignore_errors=True)
