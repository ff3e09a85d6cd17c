"""Test helpers that fake Hugging Face hub state without any network access."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from datasets.data_files import DataFilesDict
from datasets.packaged_modules.json.json import Json

# Stands in for the hub commit sha that a real download uses as the cache "hash" directory.
FAKE_HUB_REVISION = "0" * 40


def make_cached_hub_dataset(
    datasets_cache: Path,
    repo_id: str,
    splits: dict[str, list[dict]],
    config_name: str | None = None,
) -> None:
    """Write `splits` into `datasets_cache` the way `load_dataset(repo_id, config_name)` caches a hub dataset
    after an online download, so offline (HF_HUB_OFFLINE=1, HF_DATASETS_CACHE=datasets_cache) loads go through
    datasets' real "Using the latest cached version of the dataset" path.

    Produces `<cache>/<namespace>___<name>/<config or "default">/0.0.0/<hash>/` holding dataset_info.json and
    `<name>-<split>.arrow` files, built by the same packaged json builder a hub dataset of json files uses.
    """
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for split, rows in splits.items():
            path = Path(tmp, f"{split}.jsonl")
            path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
            files[split] = [str(path)]
        builder = Json(
            cache_dir=str(datasets_cache),
            dataset_name=repo_id.split("/")[-1],
            repo_id=repo_id,
            config_name=config_name,
            hash=FAKE_HUB_REVISION,
        )
        # Hub builders get hf://datasets/<repo_id>@<rev>/... data files; the builder rejects local paths
        # alongside repo_id, so point the already-created config at the local files afterwards.
        builder.config.data_files = DataFilesDict.from_patterns(files, base_path=tmp)
        builder.download_and_prepare()
