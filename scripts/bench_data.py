"""Data-path throughput, side by side with plain baselines; one JSON line per result.

    python scripts/bench_data.py                                    # BPE 16k on the stdlib corpus
    python scripts/bench_data.py tokenizer=hf tokenizer.name=gpt2   # the GPT-2 tokenizer, if cached
    python scripts/bench_data.py --docs 4000 --loader-tokens 200_000_000 --batch-size 64

Tokenisation: our preparation step (a batched `Dataset.map` over `num_proc` processes) with num_proc
1 and 2, against a plain loop calling the same tokenizer's `encode_batch` in one process.
Loading: our sampler (random windows across memory-mapped shards, to int64 tensors) at `model=gpt2`
shapes (seq 1024) against nanoGPT's reader (one np.memmap shard, random windows, torch.stack).
`vs_gpt2_h100_step` is the loader's tokens/s over the ~1M tokens/s a GPT-2 124M step consumes on an
H100: it must stay above 20. Threads are off in the tokenizer (TOKENIZERS_PARALLELISM=false) so that
processes are the only parallelism; the loader reads a warm page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"

import numpy as np
import torch

from trainer.data.corpus import find_corpus
from trainer.data.hfprepare import tokenize_chunk
from trainer.data.sampling import WindowSampler
from trainer.data.shards import ShardWriter, TokenShards
from trainer.data.tokenizers import build_tokenizer
from trainer.entry.cli import config_or_exit
from trainer.errors import ConfigError, exit_with_error

GPT2_H100_TOKENS_PER_S = 1.0e6  # what one model=gpt2 training step consumes on an H100 (the figure)


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def best_of(fn, repeats: int) -> float:
    """The fastest of `repeats` timings of fn() (noise only ever slows a run down)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_tokenizing(tokenizer, texts: list[str], repeats: int) -> None:
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    chunk = Dataset.from_dict({"text": texts})
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    n_bytes = sum(len(t.encode()) for t in texts)

    def baseline():
        for i in range(0, len(texts), 256):
            tokenizer.encode_batch(texts[i : i + 256])

    runs = {"baseline_single_process": baseline}
    for procs in (1, 2):
        runs[f"prepare_num_proc_{procs}"] = lambda p=procs: tokenize_chunk(chunk, tokenizer, "text", p)
    seconds = {name: best_of(fn, repeats) for name, fn in runs.items()}
    for name, s in seconds.items():
        emit(bench="tokenize", impl=name, tokenizer=tokenizer.identity, docs=len(texts), tokens=n_tokens,
             mb=round(n_bytes / 1e6, 2), seconds=round(s, 3), tokens_per_s=round(n_tokens / s),
             vs_baseline=round(seconds["baseline_single_process"] / s, 2))  # fmt: skip


def bench_loading(directory: Path, n_tokens: int, shard_tokens: int, batch_size: int, seq_len: int, batches: int):
    writer = ShardWriter(directory, np.dtype(np.uint16), shard_tokens)
    rng = np.random.default_rng(0)
    for _ in range(0, n_tokens, 10_000_000):
        writer.write(rng.integers(0, 50_257, size=min(10_000_000, n_tokens - writer.tokens), dtype=np.uint16))
    writer.finish()
    split = TokenShards(directory)
    sampler = WindowSampler(split, seq_len, batch_size, 0, torch.device("cpu"))
    first_shard = directory / "shard_00000.bin"
    generator = torch.Generator().manual_seed(0)

    def nanogpt_get_batch():  # nanoGPT's train.py get_batch, on one shard
        data = np.memmap(first_shard, dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - seq_len, (batch_size,), generator=generator)
        x = torch.stack([torch.from_numpy(data[i : i + seq_len].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + seq_len].astype(np.int64)) for i in ix])
        return x, y

    impls = {"baseline_numpy_one_shard": nanogpt_get_batch, "sampler_across_shards": sampler.next_batch}
    for fn in impls.values():  # warm the page cache and the allocator
        for _ in range(20):
            fn()
    seconds = {name: best_of(lambda f=fn: [f() for _ in range(batches)], 3) for name, fn in impls.items()}
    for name, s in seconds.items():
        tokens_per_s = batches * batch_size * seq_len / s
        emit(bench="load", impl=name, batch_size=batch_size, seq_len=seq_len, shards=len(split.shards),
             split_tokens=len(split), batches_per_s=round(batches / s, 1), tokens_per_s=round(tokens_per_s),
             vs_baseline=round(seconds["baseline_numpy_one_shard"] / s, 2),
             vs_gpt2_h100_step=round(tokens_per_s / GPT2_H100_TOKENS_PER_S, 1))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py (data, tokenizer)")
    parser.add_argument("--docs", type=int, default=2000, help="documents of the corpus to tokenise")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loader-tokens", type=int, default=100_000_000, help="size of the loader's test split")
    parser.add_argument("--shard-tokens", type=int, default=25_000_000)
    parser.add_argument("--batch-size", type=int, default=64, help="micro-batch (gpt2_124m_fineweb_edu: 64)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--skip-tokenize", action="store_true")
    args = parser.parse_args(argv)
    overrides = ["tokenizer=bpe", "tokenizer.vocab_size=16384", *args.overrides]
    cfg = config_or_exit(overrides)
    if not args.skip_tokenize:
        if cfg.data.kind == "hf":
            exit_with_error("bench_data.py tokenises a local corpus (data=stdlib or data=text)")
        try:
            corpus = find_corpus(cfg.data)
            tokenizer = build_tokenizer(cfg.tokenizer, corpus, Path(cfg.data.cache_dir).expanduser())
        except ConfigError as e:
            exit_with_error(str(e))
        texts = [t for _, t in zip(range(args.docs), corpus.texts(), strict=False)]
        bench_tokenizing(tokenizer, texts, args.repeats)
    with tempfile.TemporaryDirectory(dir=cfg.data.cache_dir if os.path.isdir(cfg.data.cache_dir) else None) as tmp:
        bench_loading(Path(tmp), args.loader_tokens, args.shard_tokens, args.batch_size, args.seq_len, args.batches)


if __name__ == "__main__":
    main()
