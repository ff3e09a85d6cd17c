"""Tokenise a run's data into sharded token files ahead of training (train.py does it too when the cache
is missing). Takes the same overrides as train.py:

    python scripts/prepare_data.py +experiment=gpt2_124m_fineweb_edu data.num_proc=16
    python scripts/prepare_data.py data=hf data.data_files='/data/*.jsonl' tokenizer=hf tokenizer.name=gpt2
    python scripts/prepare_data.py data=hf data.name=HuggingFaceFW/fineweb-edu data.subset=sample-10BT \
        data.max_tokens=1_000_000_000 tokenizer=hf tokenizer.name=gpt2

Interrupt it at any time: run the same command again and it carries on from its last saved chunk.
It logs where the Hugging Face caches and the token shards are, and how large they are.
"""

from __future__ import annotations

import logging
import sys

from trainer.build import prepare_data
from trainer.entry.cli import config_or_exit
from trainer.errors import ConfigError, exit_with_error


def main(argv: list[str]) -> None:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    cfg = config_or_exit(argv)
    try:
        tokenizer, splits = prepare_data(cfg, progress=True)
    except ConfigError as e:
        exit_with_error(str(e))
    for name, split in (("train", splits.train), ("val", splits.val)):
        shards = f"{len(split.shards)} shard(s) of {split.dtype.name}"
        print(f"{name}: {len(split):,} tokens in {shards} at {split.directory}")
    print(f"tokenizer: {tokenizer.identity} (vocab {tokenizer.vocab_size})")


if __name__ == "__main__":
    main(sys.argv[1:])
