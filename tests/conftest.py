"""Shared fixtures: a small generated corpus, config composition, and tiny-model overrides."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# datasets' own Arrow caches (data=hf on local files) go to a throw-away directory, not ~/.cache
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="hf-datasets-test-"))

from trainer.config import register_configs  # noqa: E402

register_configs()


def make_corpus(n_chars: int = 60_000, seed: int = 0) -> str:
    """Pseudo-English with enough structure for a tiny model to learn quickly."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the old king", "our teacher", "this robot"]
    verbs = ["sees", "likes", "finds", "follows", "paints", "remembers"]
    objects = ["the river", "a red ball", "the moon", "some bread", "the tall tree", "a small house"]
    out, size = [], 0
    while size < n_chars:
        line = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}.\n"
        out.append(line)
        size += len(line)
    return "".join(out)


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(make_corpus())
    return path


@pytest.fixture(scope="session")
def inductor_cache(tmp_path_factory):
    """One Inductor cache directory for the session (unless TORCHINDUCTOR_CACHE_DIR is set): each compiled
    optimizer step (optim/fused.py) compiles cold once, and later processes (torchrun workers, trainer
    runs) that inherit the environment load it warm."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        yield Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
        return
    path = tmp_path_factory.mktemp("inductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    yield path
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)


def tiny_overrides(tmp_path: Path, corpus: Path, extra: dict | None = None) -> list[str]:
    """A 2-layer model on the generated corpus: a few seconds per run on CPU."""
    base = {
        "data": "text", "data.path": str(corpus), "data.cache_dir": str(tmp_path / "cache"),
        "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
        "trainer.micro_batch_size": 8, "trainer.max_steps": 20, "trainer.eval_interval": 10,
        "trainer.eval_steps": 2, "trainer.log_interval": 5, "trainer.ckpt_interval": 10,
        "trainer.precision": "fp32", "trainer.progress": "false", "trainer.sample_tokens": 20,
        "trainer.device": "cpu", "logger.wandb.mode": "disabled", "schedule.warmup_steps": 5,
    }  # fmt: skip
    base.update(extra or {})
    return [f"{k}={v}" for k, v in base.items()]


def wait_for_lines(path: Path, n: int, timeout: float = 120) -> None:
    """Poll until the file at `path` holds at least n lines (a run has started logging)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.02)


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides)
