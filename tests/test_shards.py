"""Sharded token files: bounded shards, dtype choice, reads across shard boundaries, resumable writing,
and flat memory while reading a split larger than the test lets the process hold."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO

from trainer.data.shards import ShardWriter, TokenShards, shard_name, token_dtype


def write_split(directory, tokens: np.ndarray, shard_tokens: int, dtype=np.uint16, pieces: int = 7) -> TokenShards:
    writer = ShardWriter(directory, np.dtype(dtype), shard_tokens)
    for part in np.array_split(tokens, pieces):  # several writes, not aligned to shard boundaries
        writer.write(part, documents=1)
    writer.finish()
    return TokenShards(directory)


def test_shards_are_bounded_and_the_index_records_their_sizes(tmp_path):
    tokens = np.arange(1000) % 50_000
    split = write_split(tmp_path / "s", tokens, shard_tokens=300)
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert [n for _, n in index["shards"]] == [300, 300, 300, 100]
    assert index["tokens"] == 1000 and index["documents"] == 7 and index["dtype"] == "uint16"
    for name, n in index["shards"]:
        assert (tmp_path / "s" / name).stat().st_size == 2 * n
    assert len(split) == 1000
    assert np.array_equal(split.read(0, 1000), tokens)


def test_a_window_that_spans_shards_is_the_same_tokens_as_one_array(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 60_000, size=1000)
    split = write_split(tmp_path / "s", tokens, shard_tokens=128)
    for start, length in [(120, 20), (127, 2), (128, 1), (0, 1000), (100, 300), (999, 1), (250, 129)]:
        assert np.array_equal(split.read(start, length), tokens[start : start + length]), (start, length)
    starts = np.array([120, 0, 250, 871])
    assert np.array_equal(split.gather(starts, 129), np.stack([tokens[s : s + 129] for s in starts]))
    with pytest.raises(IndexError):
        split.read(900, 101)


def test_uint16_when_the_vocabulary_fits_and_uint32_otherwise(tmp_path):
    assert token_dtype(256) == np.uint16 and token_dtype(50_257) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32 and token_dtype(128_256) == np.uint32
    big = np.array([0, 65_535, 65_536, 128_255])
    split = write_split(tmp_path / "s", big, shard_tokens=3, dtype=token_dtype(128_256), pieces=2)
    assert split.dtype == np.uint32 and np.array_equal(split.read(0, 4), big)
    assert (tmp_path / "s" / shard_name(0)).stat().st_size == 3 * 4
    with pytest.raises(ValueError, match="does not fit"):
        ShardWriter(tmp_path / "t", token_dtype(50_257), 10).write(big)


def test_a_writer_resumed_from_its_state_drops_what_was_written_after_it(tmp_path):
    tokens = np.arange(2000) % 1000
    writer = ShardWriter(tmp_path / "s", np.dtype(np.uint16), 300)
    writer.write(tokens[:700], documents=3)
    state = writer.state()
    writer.write(np.full(555, 7), documents=9)  # a chunk that was interrupted before its state was saved
    writer.state()
    resumed = ShardWriter(tmp_path / "s", np.dtype(np.uint16), 300, state)
    assert not (tmp_path / "s" / shard_name(3)).exists()  # the unsaved chunk's extra shard is gone
    resumed.write(tokens[700:], documents=4)
    index = resumed.finish()
    assert index["documents"] == 7
    assert np.array_equal(TokenShards(tmp_path / "s").read(0, 2000), tokens)


def test_reading_a_split_larger_than_the_memory_allowed_keeps_memory_flat(tmp_path):
    """320 MB of shards read end to end by a process whose data segment may grow by only 96 MB."""
    n_tokens, shard = 160_000_000, 20_000_000
    writer = ShardWriter(tmp_path / "big", np.dtype(np.uint16), shard)
    block = (np.arange(4_000_000) % 50_000).astype(np.uint16)
    for _ in range(n_tokens // len(block)):
        writer.write(block)
    writer.finish()
    code = textwrap.dedent(f"""
        import resource, numpy as np, torch
        from trainer.data.shards import TokenShards
        from trainer.data.sampling import WindowSampler

        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        limit = status("VmData:") + 96 * 2**20  # what this process may still allocate
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        split = TokenShards({str(tmp_path / "big")!r})
        assert len(split) > 3 * 96 * 2**20 // 2  # the split is over three times the budget
        anon = status("RssAnon:")
        sampler = WindowSampler(split, 1024, 64, 0, torch.device("cpu"), mode="sequential")
        seen = 0
        while sampler.consumed < sampler.n:
            x, _ = sampler.next_batch()
            seen += x.numel()
        checksum = int(split.read(len(split) - 5, 5).sum())
        print(seen, (status("RssAnon:") - anon) // 2**20, checksum)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    seen, anon_growth_mb, checksum = map(int, out.stdout.split())
    assert seen >= n_tokens - 64 * 1024 * 2  # every window of the split was read
    assert anon_growth_mb < 64  # no copy of the split in private memory
    assert checksum == int((np.arange(n_tokens - 5, n_tokens) % 4_000_000 % 50_000).sum())
