"""Hydra multirun (`python train.py -m ...`): every job runs in its own directory, returns its final val
loss, joins the sweep's W&B group under a name from its overrides, and a failing job leaves the others
to finish."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, tiny_overrides

from optim.builder import load_all

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


def multirun(tmp_path, corpus, *args: str, extra: dict | None = None) -> subprocess.CompletedProcess:
    fixed = tiny_overrides(tmp_path, corpus, {"trainer.max_steps": 4, "trainer.eval_interval": 2,
                                               "trainer.sample_tokens": 0, **(extra or {})})  # fmt: skip
    cmd = [sys.executable, str(REPO / "train.py"), "-m", *args, *fixed, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def final_val_loss(job_dir) -> float:
    return [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()][-1]["val/loss"]


def test_optuna_lr_search_runs_trials_over_the_optimizers_space(tmp_path, corpus_file):
    proc = multirun(tmp_path, corpus_file, "hydra/sweeper=optuna", "+sweep=lr_search", "optimizer=lion",
                    "hydra.sweeper.n_trials=2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "setup plugin" not in proc.stdout + proc.stderr  # alembic's import chatter is silenced
    result = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    space = load_all()["lion"].space()
    assert set(result["best_params"]) == set(space) - {"schedule.warmup_steps"}  # fixed on the command line
    losses = [final_val_loss(tmp_path / "sweep" / job) for job in ("0", "1")]
    assert result["best_value"] == pytest.approx(min(losses))  # what the task returned is what Optuna minimised
    for job in ("0", "1"):  # each trial ran with the lr Optuna sampled, inside the space's log range
        lr = yaml.safe_load((tmp_path / "sweep" / job / "config.yaml").read_text())["optimizer"]["lr"]
        assert 3e-5 <= lr <= 3e-3 and lr != 3e-4


def test_optuna_records_a_failed_trial_and_goes_on(tmp_path, corpus_file):
    """A trial whose config is refused raises (Optuna's sweeper breaks on a NaN return); Optuna records it
    as failed and the study finishes with the others (max_failure_rate 1.0, as in configs/sweep/lr_search)."""
    (tmp_path / "extra" / "sweep").mkdir(parents=True)
    (tmp_path / "extra" / "sweep" / "broken.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /hydra/sweeper: optuna\nhydra:\n  sweeper:\n"
        "    n_trials: 4\n    n_jobs: 1\n    max_failure_rate: 1.0\n    sampler:\n      seed: 0\n"
        "    params:\n      optimizer.lr: choice(-1.0, 0.001)\n"
    )
    proc = multirun(tmp_path, corpus_file, "--config-dir", str(tmp_path / "extra"), "+sweep=broken")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "error: optimizer.lr=-1.0 must be > 0" in proc.stderr and "Traceback" not in proc.stderr
    result = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert result["best_params"] == {"optimizer.lr": 0.001}
    lrs = [yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())[0] for d in (tmp_path / "sweep").glob("[0-9]")]
    assert sorted(set(lrs)) == ["optimizer.lr=-1.0", "optimizer.lr=0.001"]  # both kinds of trial ran


def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path, corpus_file):
    proc = multirun(tmp_path, corpus_file, "+launcher=local", "trainer.seed=1,2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        assert final_val_loss(tmp_path / "sweep" / job) > 0
    assert list((tmp_path / "sweep" / ".submitit").iterdir())  # each job ran in its own submitit process


def test_compare_reads_a_real_sweep(tmp_path, corpus_file):
    proc = multirun(tmp_path, corpus_file, "optimizer=adamw,lion", "trainer.seed=1,2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = subprocess.run([sys.executable, str(REPO / "scripts/compare.py"), str(tmp_path / "sweep")],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "sweep" / "compare.json").read_text())
    rows = {c["label"]: c for c in report["configurations"]}
    assert set(rows) == {"optimizer=adamw", "optimizer=lion"} and report["baseline"] == "optimizer=adamw"
    adamw = [final_val_loss(tmp_path / "sweep" / job) for job in ("0", "1")]  # jobs 0, 1: adamw seeds 1, 2
    assert rows["optimizer=adamw"]["final_val_loss"]["mean"] == pytest.approx(sum(adamw) / 2)
    assert rows["optimizer=lion"]["n"] == 2 and rows["optimizer=lion"]["vs_baseline"]["final_val_loss"]["p"] >= 0
    for png in ("val_loss_vs_steps.png", "val_loss_vs_time.png"):
        assert (tmp_path / "sweep" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
