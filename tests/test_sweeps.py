"""Hydra multirun (`python train.py -m ...`): every job runs in its own directory, returns its final val
loss, joins the sweep's W&B group under a name from its overrides, and a failing job leaves the others
to finish."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml
from conftest import REPO, tiny_overrides

ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
ENV |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def sweep(tmp_path, corpus, *varying: str) -> subprocess.CompletedProcess:
    fixed = tiny_overrides(tmp_path, corpus, {"trainer.max_steps": 5, "trainer.sample_tokens": 0})
    fixed = [o for o in fixed if not o.startswith(tuple(v.split("=")[0] + "=" for v in varying))]
    cmd = [sys.executable, str(REPO / "train.py"), "-m", *fixed, *varying, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def test_two_job_multirun_returns_a_val_loss_per_job(tmp_path, corpus_file):
    proc = sweep(tmp_path, corpus_file, "trainer.seed=1,2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, seed in (("0", 1), ("1", 2)):
        job_dir = tmp_path / "sweep" / job
        assert "val loss" in (job_dir / "train.log").read_text().splitlines()[-1]  # what the task returns
        logged = yaml.safe_load((job_dir / "config.yaml").read_text())["logger"]["wandb"]
        assert logged["group"] == "-".join((tmp_path / "sweep").parts[-2:])
        assert f"trainer.seed={seed}" in logged["name"]


def test_a_broken_job_does_not_stop_the_sweep(tmp_path, corpus_file):
    proc = sweep(tmp_path, corpus_file, "optimizer.lr=-1,1e-3")  # the first job's lr is refused
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: optimizer.lr=-1.0 must be > 0"] and "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0  # the sweep finished: the failed job returned NaN, which sweepers count as failed
    assert "done: step 5" in (tmp_path / "sweep" / "1" / "train.log").read_text()
