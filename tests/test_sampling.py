"""Window sampling: shifted targets, the keyed permutation, epochs, exact resume, disjoint ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.data.sampling import WindowSampler, permute, validation_windows
from trainer.data.shards import ShardWriter, TokenShards

CPU = torch.device("cpu")


def split_of(tmp_path, n: int, shard_tokens: int = 97) -> TokenShards:
    writer = ShardWriter(tmp_path / f"split{n}", np.dtype(np.uint32), shard_tokens)
    writer.write(np.arange(n))  # token value = its position, so a window's tokens tell where it came from
    writer.finish()
    return TokenShards(tmp_path / f"split{n}")


@pytest.mark.parametrize("n", [1, 2, 3, 10, 1000, 4097])
def test_permute_is_a_bijection_that_depends_on_its_key(n):
    perm = permute(np.arange(n), n, 7, 0)
    assert sorted(perm.tolist()) == list(range(n))
    if n >= 1000:
        assert not np.array_equal(perm, np.arange(n))
        assert not np.array_equal(perm, permute(np.arange(n), n, 7, 1))
        assert np.array_equal(perm[100:200], permute(np.arange(100, 200), n, 7, 0))  # computed piecewise


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_windows_are_contiguous_with_shifted_targets(tmp_path, mode):
    split = split_of(tmp_path, 1000)
    sampler = WindowSampler(split, 16, 4, 3, CPU, mode=mode)
    for _ in range(30):  # several epochs, across shard boundaries (shards of 97 tokens)
        x, y = sampler.next_batch()
        assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
        assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 15, dtype=torch.long))
        assert torch.equal(y, x + 1) and int(y.max()) < 1000


def test_an_epoch_of_random_windows_covers_the_split_without_overlap(tmp_path):
    split = split_of(tmp_path, 1000)
    sampler = WindowSampler(split, 16, 4, 3, CPU)
    starts = np.concatenate([sampler.rank_starts() for _ in range(-(-sampler.n // 4))])[: sampler.n]
    assert len(set(starts.tolist())) == sampler.n == 61  # 999 // 16 - 1 windows, room left for a shift
    assert np.all(np.diff(np.sort(starts)) == 16)  # one grid: no two windows share a token
    assert not np.array_equal(starts, np.sort(starts))  # shuffled
    shifts = {int(WindowSampler(split, 16, 4, 3, CPU).window_starts(e * sampler.n, 1)[0] % 16) for e in range(20)}
    assert len(shifts) > 5  # each epoch moves the grid, so repeated epochs see new windows


def test_sequential_windows_follow_the_split_from_its_start(tmp_path):
    split = split_of(tmp_path, 1000)
    sampler = WindowSampler(split, 16, 4, 3, CPU, mode="sequential")
    firsts = [sampler.next_batch()[0][:, 0].tolist() for _ in range(16)]
    assert firsts[0] == [0, 16, 32, 48]
    flat = [s for batch in firsts for s in batch]
    assert flat[: sampler.n] == list(range(0, 16 * sampler.n, 16))
    assert flat[sampler.n] == 0  # then the next epoch starts over


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_a_restored_sampler_continues_exactly(tmp_path, mode):
    split = split_of(tmp_path, 5000)
    sampler = WindowSampler(split, 32, 8, 11, CPU, mode=mode)
    for _ in range(25):
        sampler.next_batch()
    state = sampler.state_dict()
    expected = [sampler.next_batch()[0] for _ in range(40)]  # into the next epochs
    restored = WindowSampler(split, 32, 8, 11, CPU, mode=mode)
    restored.load_state_dict(state)
    assert all(torch.equal(restored.next_batch()[0], e) for e in expected)
    with pytest.raises(ValueError, match="same data"):
        WindowSampler(split_of(tmp_path, 4000), 32, 8, 11, CPU, mode=mode).load_state_dict(state)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_ranks_read_disjoint_windows_that_together_are_the_single_process_batches(tmp_path, mode):
    split = split_of(tmp_path, 20_000)
    world, batch = 4, 3
    single = WindowSampler(split, 16, world * batch, 5, CPU, mode=mode)
    ranks = [WindowSampler(split, 16, batch, 5, CPU, rank=r, world=world, mode=mode) for r in range(world)]
    read = [set() for _ in range(world)]
    for _ in range(single.n // (world * batch)):  # one epoch
        whole = single.next_batch()[0]
        parts = [r.next_batch()[0] for r in ranks]
        assert torch.equal(torch.cat(parts), whole)
        for r, part in enumerate(parts):
            read[r].update(part.flatten().tolist())
    for a in range(world):
        for b in range(a + 1, world):
            assert not read[a] & read[b], f"ranks {a} and {b} read the same tokens"
    assert all(r.state_dict() == single.state_dict() for r in ranks)  # one state resumes any world size


def test_peek_shows_the_next_batches_without_consuming_them(tmp_path):
    sampler = WindowSampler(split_of(tmp_path, 1000), 16, 4, 3, CPU)
    peeked = sampler.peek(2)
    for x, _ in peeked:
        assert torch.equal(sampler.next_batch()[0], x)


def test_validation_windows_are_the_same_at_every_evaluation(tmp_path):
    split = split_of(tmp_path, 1000)
    first = [validation_windows(split, 16, 4, CPU).next_batch()[0] for _ in range(2)]
    assert torch.equal(first[0], first[1]) and first[0][:, 0].tolist() == [0, 16, 32, 48]


def test_a_split_shorter_than_one_window_is_refused(tmp_path):
    with pytest.raises(ValueError, match="holds no window"):
        WindowSampler(split_of(tmp_path, 16), 16, 1, 0, CPU)
    assert WindowSampler(split_of(tmp_path, 17), 16, 1, 0, CPU).n == 1
