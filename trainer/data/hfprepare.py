"""A Hugging Face dataset (trainer/data/hf.py) -> sharded token files (trainer/data/shards.py), once.

`prepare_hf` tokenises in chunks, each with a parallel batched `Dataset.map` (`data.num_proc`), and
writes an end-of-text token after every document. After every chunk the writers' state is saved, so
an interrupted preparation carries on where it stopped; the cache is renamed into place, with its
`meta.json`, only when complete. Validation is a held-out split (`data.val_split`) or a fixed
`data.val_fraction` of the documents, chosen by a hash of their position: never a training document.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from trainer.config import DataConfig
from trainer.data.corpus import CACHE_FORMAT, TokenSplits, open_splits
from trainer.data.hf import HFSource
from trainer.data.sampling import keyed_hash
from trainer.data.shards import ShardWriter, token_dtype

log = logging.getLogger(__name__)
VAL_KEY = 0x5EED  # keys the hash that picks held-out documents


def _encode(batch: dict, tokenizer, field: str) -> dict:
    return {"ids": [ids.astype(np.int32) for ids in tokenizer.encode_batch([t or "" for t in batch[field]])]}


def tokenize_chunk(chunk, tokenizer, field: str, num_proc: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of every document of a datasets.Dataset chunk, in order: (concatenated ids, lengths).
    A batched `Dataset.map`, over `num_proc` processes when the chunk is big enough to share."""
    import pyarrow.compute as pc

    procs = num_proc if num_proc > 1 and len(chunk) >= 4 * num_proc else None
    out = chunk.map(
        _encode, batched=True, batch_size=256, num_proc=procs, remove_columns=chunk.column_names,
        fn_kwargs={"tokenizer": tokenizer, "field": field}, keep_in_memory=True, load_from_cache_file=False,
        desc=None,
    )  # fmt: skip
    ids = out.data.column("ids").combine_chunks()
    return ids.flatten().to_numpy(), pc.list_value_length(ids).to_numpy().astype(np.int64)


def _chunks(ds, start: int, chunk_docs: int, field: str):
    """(first row, datasets.Dataset of up to chunk_docs texts) from row `start` on, for maps and streams."""
    import datasets

    if isinstance(ds, datasets.Dataset):
        ds = ds.select_columns([field])
        for a in range(start, len(ds), chunk_docs):
            yield a, ds.select(range(a, min(a + chunk_docs, len(ds))))
        return
    rows = iter(ds.skip(start) if start else ds)
    a = start
    while batch := [row[field] for row in itertools.islice(rows, chunk_docs)]:
        yield a, datasets.Dataset.from_dict({field: batch})
        a += len(batch)


@dataclass
class _Job:
    """One pass over a split: its documents go to train, to val, or to val by a hash of their position."""

    name: str
    ds: object
    cap: int | None  # tokens this job may write at most
    assign: str  # "train" | "val" | "hash" (val_fraction of the documents)


def _save_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def cache_key(source: HFSource, tokenizer, cfg: DataConfig) -> str:
    parts = (CACHE_FORMAT, source.fingerprint, tokenizer.identity, cfg.text_field, cfg.val_split, cfg.val_fraction,
             cfg.max_tokens, cfg.val_max_tokens, cfg.shard_tokens)  # fmt: skip
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def prepare_hf(
    source: HFSource, tokenizer, cache_dir: Path, progress: bool = True, chunk_docs: int = 8192,
    on_chunk=None,
) -> TokenSplits:  # fmt: skip
    """Tokenise the dataset into `cache_dir/hf-KEY/{train,val}` once; resume an interrupted attempt.

    `on_chunk(job, docs_done)` is called after each saved chunk (tests use it to interrupt)."""
    cfg = source.cfg
    target = cache_dir / f"hf-{cache_key(source, tokenizer, cfg)}"
    if (target / "meta.json").exists():
        return open_splits(target)
    work = target.with_name(target.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    saved = json.loads((work / "progress.json").read_text()) if (work / "progress.json").exists() else {}
    if saved:
        log.info("resuming the preparation in %s at %s document %d", work, saved["job"], saved["docs"])
    dtype = token_dtype(tokenizer.vocab_size)
    states = saved.get("writers", {})
    writers = {s: ShardWriter(work / s, dtype, cfg.shard_tokens, states.get(s)) for s in ("train", "val")}
    if cfg.val_split:
        val, train = (
            _Job("val", source.val, cfg.val_max_tokens, "val"),
            _Job("train", source.train, cfg.max_tokens, "train"),
        )
        jobs = [val, train]
    else:
        jobs = [_Job("train", source.train, cfg.max_tokens, "hash")]
    num_proc = cfg.num_proc or min(8, os.cpu_count() or 1)
    if num_proc > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the processes are the parallelism
    names = [j.name for j in jobs]
    for job in jobs[names.index(saved["job"]) if saved else 0 :]:
        resumed = saved.get("job") == job.name
        docs = saved["docs"] if resumed else 0
        written = saved["written"] if resumed else 0
        _run_job(job, writers, tokenizer, cfg, num_proc, docs, written, chunk_docs, work, progress, on_chunk)
        saved = {}
    meta = {
        "format": CACHE_FORMAT, "source": source.description, "tokenizer": tokenizer.identity,
        "vocab_size": tokenizer.vocab_size, "dtype": dtype.name,
    }  # fmt: skip
    for split, writer in writers.items():
        index = writer.finish(tokenizer=tokenizer.identity, source=source.description)
        meta[f"{split}_tokens"], meta[f"{split}_documents"] = index["tokens"], index["documents"]
    (work / "progress.json").unlink(missing_ok=True)
    (work / "meta.json").write_text(json.dumps(meta, indent=1))
    os.replace(work, target)  # complete: only now does the cache exist
    log.info("tokenised %s train / %s val tokens into %s", f"{meta['train_tokens']:,}", f"{meta['val_tokens']:,}",
             target)  # fmt: skip
    return open_splits(target)


def _run_job(job, writers, tokenizer, cfg, num_proc, docs, written, chunk_docs, work, progress, on_chunk) -> None:
    import datasets

    datasets.disable_progress_bars()  # ours counts documents across chunks
    total = getattr(job.ds, "num_rows", None)
    bar = tqdm(total=total, initial=docs, unit="doc", desc=f"tokenizing {job.name}", disable=not progress)
    eot = tokenizer.eot_id
    for first, chunk in _chunks(job.ds, docs, chunk_docs, cfg.text_field):
        values, lengths = tokenize_chunk(chunk, tokenizer, cfg.text_field, num_proc)
        if eot is not None:  # an end-of-text token after every document
            values = np.insert(values, np.cumsum(lengths), eot)
            lengths = lengths + 1
        if job.assign == "hash":
            threshold = np.uint64(int(cfg.val_fraction * (2**64 - 1)))
            is_val = keyed_hash(np.arange(first, first + len(lengths)), VAL_KEY) < threshold
        else:
            is_val = np.full(len(lengths), job.assign == "val")
        done = job.cap is not None and written + len(values) >= job.cap
        if done:  # keep exactly `cap` tokens: the last document is cut
            keep = job.cap - written
            values = values[:keep]
            n_docs = int(np.searchsorted(np.cumsum(lengths), keep, side="left")) + 1
            lengths, is_val = lengths[:n_docs], is_val[:n_docs]
            lengths[-1] -= int(lengths.sum()) - keep
        token_is_val = np.repeat(is_val, lengths)
        writers["val"].write(values[token_is_val], documents=int(is_val.sum()))
        writers["train"].write(values[~token_is_val], documents=int((~is_val).sum()))
        written += len(values)
        docs = first + len(chunk)
        states = {s: w.state() for s, w in writers.items()}
        _save_json(work / "progress.json", {"job": job.name, "docs": docs, "written": written, "writers": states})
        bar.update(len(chunk))
        bar.set_postfix(tokens=f"{written:,}")
        if on_chunk is not None:
            on_chunk(job.name, docs)
        if done:
            break
    bar.close()
