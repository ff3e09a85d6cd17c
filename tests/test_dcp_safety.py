"""A sharded (FSDP) checkpoint whose `.metadata` is a crafted pickle runs nothing: export, sample and resume
each refuse it in one line, and the command it names never runs (issue 14, item 4)."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_corpus, tiny_overrides
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from trainer import checkpoint as ckpt_io
from trainer.dcp_reader import read_metadata

ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
ENV |= {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """A 2-rank FSDP run of 4 steps: its checkpoint is sharded."""
    tmp = tmp_path_factory.mktemp("fsdp")
    corpus = tmp / "corpus.txt"
    corpus.write_text(make_corpus())
    extra = {"trainer.max_steps": 4, "trainer.ckpt_interval": 4, "trainer.sample_tokens": 0}
    overrides = tiny_overrides(tmp, corpus, extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train.py"),
           *overrides, "distributed=fsdp", "distributed.param_dtype=fp32", f"hydra.run.dir={tmp / 'run'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def copy_run(sharded_run: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(run, its checkpoint, a marker file that the payload would create)."""
    run_dir = tmp_path / "run"
    shutil.copytree(sharded_run / "run", run_dir)
    return run_dir, ckpt_io.list_checkpoints(run_dir / "checkpoints")[-1], tmp_path / "it-ran"


def sign(ckpt: Path) -> None:
    """Rewrite the manifest to match, as an attacker would: the checkpoint then counts as complete."""
    ckpt_io.write_manifest(ckpt, int(ckpt.name[5:]))
    assert ckpt_io.is_complete(ckpt) is None


@pytest.fixture
def poisoned(sharded_run, tmp_path) -> tuple[Path, Path, Path]:
    """A copy of the run whose checkpoint's .metadata would `touch` a marker file."""
    run_dir, ckpt, marker = copy_run(sharded_run, tmp_path)
    (ckpt / ckpt_io.SHARDED / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    sign(ckpt)
    return run_dir, ckpt, marker


def test_a_real_checkpoints_metadata_reads(sharded_run):
    ckpt = ckpt_io.list_checkpoints(sharded_run / "run" / "checkpoints")[-1]
    metadata = read_metadata(ckpt / ckpt_io.SHARDED / ".metadata")
    assert any(key.startswith("model.") for key in metadata.state_dict_metadata)
    model = ckpt_io.load_model(ckpt)  # and the whole load path runs through the safe reader
    assert model.config.n_layer == 2


def one_line_refusal(proc: subprocess.CompletedProcess, marker: Path) -> None:
    assert not marker.exists(), "the pickle's command ran"
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "posix.system" in lines[0] and "not loaded, nothing from it was run" in lines[0]


def test_export_refuses_a_crafted_metadata_pickle(poisoned):
    run_dir, ckpt, marker = poisoned
    proc = subprocess.run([sys.executable, str(REPO / "scripts/export.py"), str(ckpt), "--out", str(run_dir / "x")],
                          env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    one_line_refusal(proc, marker)


def test_sample_refuses_a_crafted_metadata_pickle(poisoned):
    run_dir, _, marker = poisoned
    proc = subprocess.run([sys.executable, str(REPO / "scripts/sample.py"), str(run_dir), "--max-new-tokens", "3"],
                          env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    one_line_refusal(proc, marker)


def test_resume_refuses_a_crafted_metadata_pickle(poisoned, sharded_run):
    run_dir, _, marker = poisoned
    overrides = tiny_overrides(sharded_run, sharded_run / "corpus.txt", {"trainer.max_steps": 6})
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, "trainer.resume=auto", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    one_line_refusal(proc, marker)


def test_resume_refuses_a_crafted_pickle_among_the_shards(sharded_run, tmp_path):
    """The optimizer's param groups are pickled entries of the shard files; DCP's own planner reads them with
    torch.load(weights_only=False). Point one of them at a payload: the resume refuses it, nothing runs."""
    run_dir, ckpt, marker = copy_run(sharded_run, tmp_path)
    meta_path = ckpt / ckpt_io.SHARDED / ".metadata"
    metadata = read_metadata(meta_path)
    pickled = {fqn for fqn, meta in metadata.state_dict_metadata.items() if isinstance(meta, BytesStorageMetadata)}
    index = next(i for i in metadata.storage_data if i.fqn in pickled)
    info = metadata.storage_data[index]
    shard = ckpt / ckpt_io.SHARDED / info.relative_path
    payload, offset = pickle.dumps(Payload(marker)), shard.stat().st_size
    with shard.open("ab") as f:
        f.write(payload)
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(payload))
    meta_path.write_bytes(pickle.dumps(metadata))
    sign(ckpt)
    overrides = tiny_overrides(sharded_run, sharded_run / "corpus.txt", {"trainer.max_steps": 6})
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, "trainer.resume=auto", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert not marker.exists(), "the pickle's command ran"
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "could not be read safely" in lines[0]
