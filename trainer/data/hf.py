"""Hugging Face datasets -> sharded token files (`data=hf`).

`open_source` finds the dataset, `datasets.load_dataset(name, subset, split=...)` from the hub or its
local cache, `load_from_disk` for a saved dataset, or the json/parquet/csv/text builders for
`data.data_files`, and turns every way that can fail into one line that says what to do.
trainer/data/hfprepare.py tokenises it into sharded token files; `cache_report` says where the
Hugging Face caches and the shards are, and how much disk they take.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from trainer.config import DataConfig
from trainer.errors import ConfigError, hub_unreachable

log = logging.getLogger(__name__)
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv",
           ".txt": "text", ".md": "text", ".arrow": "arrow"}  # fmt: skip
TOKENIZER_DOCS = 100_000  # documents a char or BPE tokenizer is trained on
VAL_KEY = 0x5EED  # keys the hash that picks held-out documents


@dataclass
class HFSource:
    """The opened dataset: train (and val) splits, and what identifies their contents."""

    cfg: DataConfig
    train: object  # datasets.Dataset or IterableDataset
    val: object | None
    fingerprint: str
    description: str

    def texts(self):
        column = self.train.select_columns([self.cfg.text_field])
        for row in itertools.islice(column, TOKENIZER_DOCS):
            yield row[self.cfg.text_field] or ""

    @property
    def n_texts(self) -> int:
        return min(TOKENIZER_DOCS, getattr(self.train, "num_rows", None) or TOKENIZER_DOCS)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _data_format(cfg: DataConfig) -> str:
    if cfg.data_format:
        return cfg.data_format
    files = cfg.data_files
    first = next(iter(files.values())) if isinstance(files, dict) else files
    first = first[0] if isinstance(first, (list, tuple)) else first
    name = str(first).lower().removesuffix(".gz").removesuffix(".zst")
    fmt = FORMATS.get(Path(name).suffix)
    if fmt is None:
        raise ConfigError(
            f"data.data_files={first!r}: cannot tell the format from its extension; set data.data_format="
            f"json|parquet|csv|text"
        )
    return fmt


def _files(files):
    """data.data_files as datasets takes it (a path, a list, or {split: path or list}), with ~ expanded."""
    if isinstance(files, dict):
        return {k: _files(v) for k, v in files.items()}
    if isinstance(files, (list, tuple)):
        return [os.path.expanduser(str(f)) for f in files]
    return os.path.expanduser(str(files))


def _is_saved(name: str | None) -> bool:
    """A directory written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    return bool(name) and any((Path(name).expanduser() / f).exists() for f in ("state.json", "dataset_dict.json"))


def _local_files(cfg: DataConfig) -> list[str]:
    """The files data.data_files names on this machine (URLs and hf:// paths are left to datasets)."""
    import glob

    files = _files(cfg.data_files)
    groups = files.values() if isinstance(files, dict) else [files]
    found = []
    for pattern in (f for v in groups for f in ([v] if isinstance(v, str) else v)):
        if "://" in pattern:
            continue
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise ConfigError(f"data.data_files: {pattern!r} matches no files: check the path or glob")
        found += matches
    return found


def _load_split(cfg: DataConfig, split: str):
    import datasets

    if cfg.data_files:
        local = _local_files(cfg)
        if local and all(os.path.getsize(f) == 0 for f in local):
            raise ConfigError(f"data.data_files={cfg.data_files!r}: the files are empty: point it at files with text")
        fmt = _data_format(cfg)
        extra = {"sample_by": "document"} if fmt == "text" else {}  # one file = one document
        return datasets.load_dataset(fmt, data_files=_files(cfg.data_files), split=split, streaming=cfg.streaming,
                                     **extra)  # fmt: skip
    if _is_saved(cfg.name):
        ds = datasets.load_from_disk(str(Path(cfg.name).expanduser()))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f'Unknown split "{split}". Should be one of {list(ds)}.')
            ds = ds[split]
        return ds.to_iterable_dataset() if cfg.streaming else ds
    return datasets.load_dataset(cfg.name, cfg.subset, split=split, streaming=cfg.streaming)


def _what(cfg: DataConfig) -> str:
    if cfg.data_files:
        return f"data.data_files={cfg.data_files!r}"
    return f"data.name={cfg.name!r}" + (f" data.subset={cfg.subset!r}" if cfg.subset else "")


def _open_split(cfg: DataConfig, split: str):
    """One split, or a ConfigError that says what to do."""
    from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError

    what = _what(cfg)
    try:
        return _load_split(cfg, split)
    except DatasetNotFoundError as e:
        raise ConfigError(
            f"{what} is not a dataset on the Hugging Face hub or a local directory ({_one_line(e)}): check the "
            f"name, log in (`hf auth login` or HF_TOKEN) if it is gated or private, or point data.data_files "
            f"at local files"
        ) from None
    except ConnectionError:
        raise ConfigError(
            f"{what} is not in the local datasets cache and {hub_unreachable()}: run once with network access (log in "
            f"for gated datasets) to fill the cache and then set HF_HUB_OFFLINE=1, or point data.data_files at "
            f"local files"
        ) from None
    except FileNotFoundError as e:
        raise ConfigError(f"{what}: no such files ({_one_line(e)}): check the path or glob") from None
    except ValueError as e:
        if "corresponds to no data" in str(e):
            raise ConfigError(f"{what} split {split!r} is empty: choose another data.split or other files") from None
        if "split" in str(e).lower():
            raise ConfigError(f"{what}: data.split={split!r} does not exist ({_one_line(e)})") from None
        if "config" in str(e).lower():
            raise ConfigError(
                f"{what}: data.subset={cfg.subset!r} is not one of its subsets ({_one_line(e)})"
            ) from None
        raise ConfigError(f"{what}: {_one_line(e)}") from None
    except (StopIteration, IndexError, KeyError, DatasetGenerationError) as e:  # unreadable or odd files
        raise ConfigError(f"{what} could not be read as a dataset ({_one_line(e)}): check data.data_format") from None


def _check_columns(ds, cfg: DataConfig, split: str) -> None:
    """The text field exists and the split holds at least one row."""
    what = f"{_what(cfg)} split {split!r}"
    if getattr(ds, "num_rows", None) == 0:
        raise ConfigError(f"{what} is empty: choose another data.split or point data.data_files at non-empty files")
    columns = ds.column_names
    if getattr(ds, "num_rows", None) is None:  # a stream: read its first row
        first = next(iter(ds), None)
        if first is None:
            raise ConfigError(f"{what} is empty: choose another data.split or point data.data_files elsewhere")
        columns = columns or list(first)
    if cfg.text_field not in columns:
        raise ConfigError(
            f"{what} has no column data.text_field={cfg.text_field!r}; its columns are {columns}: set data.text_field"
        )


def open_source(cfg: DataConfig) -> HFSource:
    train = _open_split(cfg, cfg.split)
    _check_columns(train, cfg, cfg.split)
    val = None
    if cfg.val_split:
        val = _open_split(cfg, cfg.val_split)
        _check_columns(val, cfg, cfg.val_split)
    description = f"{_what(cfg)} split={cfg.split} val={cfg.val_split or cfg.val_fraction} field={cfg.text_field}"
    prints = [getattr(ds, "_fingerprint", None) for ds in (train, val) if ds is not None]
    if cfg.streaming or None in prints:  # streams have no content fingerprint: name them, and local files' stats
        prints = [description, *_local_stats(cfg)]
    fingerprint = hashlib.sha256("|".join(map(str, prints)).encode()).hexdigest()[:16]
    return HFSource(cfg, train, val, fingerprint, description)


def _local_stats(cfg: DataConfig) -> list[str]:
    if not cfg.data_files:
        return []
    return [f"{p}:{os.stat(p).st_size}:{os.stat(p).st_mtime_ns}" for p in _local_files(cfg)]


def _dir_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def cache_report(token_dir: Path | None = None) -> str:
    """Where the Hugging Face caches and our token shards are, and how much disk each takes."""
    from datasets import config
    from huggingface_hub import constants

    places = [("datasets cache", Path(config.HF_DATASETS_CACHE)), ("hub cache", Path(constants.HF_HUB_CACHE))]
    if token_dir is not None:
        places.append(("token shards", token_dir))
    return "; ".join(f"{name} {path} ({_gb(_dir_size(path)) if path.exists() else 'empty'})" for name, path in places)
