"""Benchmark jobs through Hydra's launcher for real (train.py -m over job config files, two launches at once):
each run lands in its own directory with the job's values, a refused job is marked failed with its error line,
and a second launch of the same jobs runs nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from conftest import make_corpus

from trainer.lab.benchmark.config import load_config, settings
from trainer.lab.benchmark.jobs import Job, make_job
from trainer.lab.benchmark.launch import HydraLauncher, threads_per_job
from trainer.lab.benchmark.protocol import Benchmark


def test_jobs_run_through_train_py_multirun_and_are_not_run_twice(tmp_path: Path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus(30_000))
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump({
        "optimizers": ["adamw", "lion"],
        "regime": ["data=text", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "model.block_size=16",
                   "trainer.micro_batch_size=4", "trainer.precision=fp32", "trainer.device=cpu",
                   "logger.wandb.mode=disabled"],
        "sizes": [{"name": "a", "model": ["model.n_layer=1", "model.n_head=2", "model.n_embd=16"],
                   "budgets": [0.25, 0.5, 1]}],
        "evals_per_run": 2, "eval_batches": 2,
    }))  # fmt: skip
    cfg = load_config(str(preset), [])
    adamw, lion = settings(cfg)
    jobs = [make_job(cfg, adamw, adamw.defaults | {"optimizer.lr": 3e-3}, 0.25, 1, "tune"),
            make_job(cfg, lion, lion.defaults | {"optimizer.lr": -1.0}, 0.25, 1, "tune"),  # refused by the trainer
            make_job(cfg, lion, lion.defaults, 0.25, 2, "tune")]  # fmt: skip
    out = tmp_path / "out"
    launcher = HydraLauncher(out, [], poll_s=0.5, local_jobs=2)  # two launches at once, 1 thread per job here
    bench = Benchmark(cfg, [adamw, lion], out, launcher, progress=False)
    bench.execute(jobs, "tune")
    ok, refused, ok2 = (bench.result(j) for j in jobs)
    assert (ok.status, refused.status, ok2.status) == ("ok", "failed", "ok"), (refused.reason, ok.reason)
    assert "optimizer.lr=-1.0 must be > 0" in refused.reason and refused.loss == float("inf")
    ran = yaml.safe_load((out / "runs" / jobs[0].key / "config.yaml").read_text())
    steps = jobs[0].steps
    assert ran["optimizer"]["lr"] == 3e-3 and ran["trainer"]["max_steps"] == steps and ran["trainer"]["seed"] == 1
    assert ran["schedule"]["warmup_steps"] == round(0.1 * steps) and ran["trainer"]["resume"] == "auto"
    finals = [json.loads(line) for line in (out / "runs" / jobs[0].key / "metrics.jsonl").read_text().splitlines()]
    assert finals[-1]["step"] == steps and ok.final_loss == finals[-1]["val/loss"]
    assert len(ok.evals) == 3  # step 0, then every ceil(steps / evals_per_run) steps, the last at the end
    bench.execute(jobs, "tune")  # all done: no second launch
    assert len(list((out / "logs").glob("launch-*.log"))) == 2  # jobs 0 and 2 in one, job 1 in the other
    assert [json.loads(line)["runs"] for line in (out / "ledger.jsonl").read_text().splitlines()] == [3]


def test_after_a_launch_a_crash_is_marked_failed_but_a_signal_or_a_run_never_started_is_left_to_resume(tmp_path):
    """launch.finish: what ended without a final evaluation, and why."""
    import pytest

    from trainer.errors import ConfigError
    from trainer.lab.benchmark.launch import finish
    from trainer.lab.benchmark.results import MARKER, read_run

    def job(key):
        return Job("tune", "a", "adamw", 1.0, 1, (), 10, (), key)

    def started(key, last_log_line):
        (tmp_path / key / ".hydra").mkdir(parents=True)
        (tmp_path / key / "train.log").write_text(f"[12:00:00] step 0: val loss 5.5\n[12:00:01] {last_log_line}\n")

    log = tmp_path / "launch-0001.log"
    log.write_text("[HYDRA] \t#0 : +bench_job=crashed\nerror: optimizer.lr=-1.0 must be > 0\n"
                   "[HYDRA] \t#1 : +bench_job=stopped\n")
    started("crashed", "building the model")
    started("stopped", "SIGTERM at step 5: checkpoint saved; continue with trainer.resume=auto hydra.run.dir=x")
    done = []
    waiting = {k: job(k) for k in ("crashed", "stopped", "never")}
    with pytest.raises(ConfigError, match="with 2 run\\(s\\) not started or interrupted"):
        finish(waiting, tmp_path, log, 0, lambda j: done.append(j.key))
    assert done == ["crashed"] and "optimizer.lr=-1.0 must be > 0" in read_run(tmp_path / "crashed", 10).reason
    assert read_run(tmp_path / "stopped", 10).status == "pending" and not (tmp_path / "never").exists()
    started("killed", "step 3 ...")
    with pytest.raises(ConfigError, match="stopped by a signal \\(exit code -15\\)"):
        finish({"killed": job("killed")}, tmp_path, log, -15, done.append)
    assert not (tmp_path / "killed" / MARKER).exists()  # the whole launch was stopped: nothing is a failure


def test_several_local_launches_share_out_the_cores():
    cores = os.cpu_count() or 1
    assert threads_per_job(1) is None  # one launch: torch's own default
    assert threads_per_job(2) == max(1, cores // 2) and threads_per_job(4 * cores) == 1
