"""Training windows from a token split: random or sequential, disjoint across ranks, exactly resumable.

The split is cut into `n` non-overlapping windows of `seq_len + 1` tokens (input and shifted target
share their boundary token). The global stream of windows is epoch after epoch of those `n`:
  - `sequential`: in the order they lie in the split, from its first token (a document start);
  - `random`: in a seeded pseudo-random order, a new one each epoch, and with the whole grid shifted
    by a seeded offset in [0, seq_len) each epoch, so repeated epochs see new windows.
The order is a keyed bijection (a Feistel network), computed for the windows a batch needs: no
permutation table, so memory does not grow with the dataset.

Each global batch takes the next `world x batch_size` windows of the stream and rank r keeps its
slice, so within an epoch no two ranks ever read the same tokens, and together they read what one
process with the global batch would. The whole state is one number, the windows consumed, the same
on every rank: a checkpoint resumes exactly, at any world size.
"""

from __future__ import annotations

import numpy as np
import torch


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-mixed 64-bit hash of each element (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(*key: int) -> np.uint64:
    """One well-mixed 64-bit value from a tuple of integers (seed, epoch, round, ...)."""
    h = np.zeros(1, dtype=np.uint64)
    for k in key:
        h = _mix(h ^ np.array([k & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return h[0]


def keyed_hash(values: np.ndarray, *key: int) -> np.ndarray:
    """A uint64 hash of each value under an integer key (seed, epoch, ...)."""
    return _mix(np.asarray(values, dtype=np.uint64) ^ _key(*key))


def permute(indices: np.ndarray, n: int, *key: int, rounds: int = 4) -> np.ndarray:
    """The images of `indices` under a keyed pseudo-random permutation of [0, n).

    A balanced Feistel network permutes [0, 4^h) for the smallest 4^h >= n; values that land outside
    [0, n) are sent through it again (cycle walking), which keeps it a bijection of [0, n).
    """
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    low, shift = np.uint64((1 << half) - 1), np.uint64(half)
    round_keys = [_key(*key, r) for r in range(rounds)]
    out = np.asarray(indices, dtype=np.uint64).copy()
    todo = np.ones(len(out), dtype=bool)
    while todo.any():
        x = out[todo]
        left, right = x >> shift, x & low
        for k in round_keys:
            left, right = right, left ^ (_mix(right ^ k) & low)
        out[todo] = (left << shift) | right
        todo = out >= np.uint64(n)
    return out.astype(np.int64)


class WindowSampler:
    """Batches of (input, target) windows for one rank; see the module docstring."""

    def __init__(
        self, tokens, seq_len: int, batch_size: int, seed: int, device: torch.device, rank: int = 0,
        world: int = 1, mode: str = "random",
    ):  # fmt: skip
        if mode not in ("random", "sequential"):
            raise ValueError(f"unknown sampling mode {mode!r}: random | sequential")
        if len(tokens) < seq_len + 1:
            raise ValueError(f"a split of {len(tokens)} tokens holds no window of {seq_len + 1}")
        self.tokens, self.seq_len, self.batch_size, self.device = tokens, seq_len, batch_size, device
        self.seed, self.rank, self.world, self.mode = seed, rank, world, mode
        total = len(tokens) - 1  # a window of seq_len inputs needs one more token for its last target
        # Keep room for a shift of up to seq_len - 1 when there are windows to spare.
        self.n = max(1, total // seq_len - (1 if mode == "random" and total // seq_len > 1 else 0))
        self.max_shift = min(seq_len - 1, total - self.n * seq_len) if mode == "random" else 0
        self.consumed = 0  # windows of the global stream taken so far (by all ranks)

    def window_starts(self, first: int, count: int) -> np.ndarray:
        """Token offsets of global stream windows first .. first + count - 1."""
        g = np.arange(first, first + count, dtype=np.int64)
        epoch, i = g // self.n, g % self.n
        starts = np.empty(count, dtype=np.int64)
        for e in np.unique(epoch):
            sel = epoch == e
            if self.mode == "random":
                order = permute(i[sel], self.n, self.seed, int(e))
                shift = int(keyed_hash(np.array([e]), self.seed, -1)[0] % np.uint64(self.max_shift + 1))
                starts[sel] = order * self.seq_len + shift
            else:
                starts[sel] = i[sel] * self.seq_len
        return starts

    def rank_starts(self) -> np.ndarray:
        """This rank's window starts in the next global batch (and advance past that batch)."""
        first = self.consumed + self.rank * self.batch_size
        self.consumed += self.world * self.batch_size
        return self.window_starts(first, self.batch_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        window = torch.from_numpy(self.tokens.gather(self.rank_starts(), self.seq_len + 1))
        if self.device.type == "cuda":
            window = window.pin_memory().to(self.device, non_blocking=True)
        else:
            window = window.to(self.device)
        return window[:, :-1], window[:, 1:]

    def peek(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The next n batches, without consuming them: the training stream is unchanged."""
        consumed = self.consumed
        batches = [self.next_batch() for _ in range(n)]
        self.consumed = consumed
        return batches

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "mode": self.mode, "windows": self.n}

    def load_state_dict(self, state: dict) -> None:
        if "consumed" not in state:
            raise ValueError("its data sampler state is from an older format: start a new run")
        if (state["windows"], state["mode"]) != (self.n, self.mode):
            raise ValueError(
                f"it was trained on {state['windows']} {state['mode']} windows, this run has {self.n} {self.mode} "
                f"windows: resume with the same data, data.seq_len and data.sampling"
            )
        self.consumed = int(state["consumed"])


def validation_windows(tokens, seq_len: int, batch_size: int, device: torch.device, rank: int = 0, world: int = 1):
    """The validation stream: the split's windows in order from its start, the same at every evaluation."""
    return WindowSampler(tokens, seq_len, batch_size, 0, device, rank, world, mode="sequential")
