"""scripts/bench.py --baseline and --profile, and scripts/bench_speedrun.py: they run, print their JSON lines, and the
minimal loop is the same training as ours (in fp32, same batches and init: the same val loss), so that the race
compares speed, not recipes. Timings themselves are never asserted (the machine is shared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled"}


def bench(*args: str, script: str = "scripts/bench.py") -> list[dict]:
    proc = subprocess.run([sys.executable, script, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_the_baseline_trains_like_our_loop_and_both_are_timed(tmp_path, corpus_file):
    extra = {"trainer.max_steps": 30, "trainer.log_interval": 5, "trainer.eval_interval": 10,
             "schedule.warmup_steps": 5, "trainer.compile": "false"}  # fmt: skip
    lines = bench("--baseline", "--cold", *tiny_overrides(tmp_path, corpus_file, extra))
    assert [r["result"] for r in lines] == ["per_step", "race"]
    per_step, race = lines
    assert per_step["ours_ms"] > 0 and per_step["baseline_ms"] > 0 and per_step["ratio"] > 0
    # fp32, the same init, batches, lr schedule and clipping: the two loops train the same model
    assert abs(race["ours_final_val_loss"] - race["baseline_val_loss"]) < 1e-3, race
    assert race["ours_step"] == 30 and race["ratio"] > 0 and race["ours_numerics"] == "fp32"


def test_profile_lists_the_top_ops(tmp_path, corpus_file):
    lines = bench("--steps", "2", "--warmup", "1", "--profile", "3", *tiny_overrides(tmp_path, corpus_file))
    assert "ms_per_step" in lines[0]
    ops = [r for r in lines[1:] if r["result"] == "profile"]
    assert len(ops) == 12 and any(r["op"] == "aten::mm" or r["op"] == "aten::addmm" for r in ops)
    assert all(0 <= r["share"] <= 1 for r in ops) and ops[0]["self_ms_per_step"] >= ops[-1]["self_ms_per_step"]


def test_bench_speedrun_runs_both_and_prints_the_ratio(tmp_path, corpus_file):
    """With a tiny model for both runs (the overrides apply to both): the wiring, not the figures."""
    model = tiny_overrides(tmp_path, corpus_file, {"trainer.max_steps": 4, "trainer.eval_interval": 2,
                                                  "trainer.sample_tokens": 0})  # fmt: skip
    lines = bench(*model, script="scripts/bench_speedrun.py")
    assert [r.get("run", r.get("result")) for r in lines] == ["default", "speedrun", "speedrun_vs_default"]
    assert lines[1]["steps"] == 4 and lines[0]["wall_s"] > 0 and lines[2]["ratio"] > 0
    assert any(c.startswith("precision: fp32") for c in lines[0]["chose"])


def test_the_speedrun_is_the_default_runs_model_data_and_val_windows():
    """+experiment=speedrun may change the optimizer, schedule, batch and extras, not what its loss is measured
    on: the same model, corpus, tokenizer and val split, and the same 640 val windows (eval_steps x batch)."""
    from trainer.entry.cli import compose_config

    default, speedrun = compose_config([]), compose_config(["+experiment=speedrun"])
    assert speedrun.model == default.model and speedrun.data == default.data
    assert speedrun.tokenizer == default.tokenizer
    d, s = default.trainer, speedrun.trainer
    assert s.eval_steps * s.micro_batch_size == d.eval_steps * d.micro_batch_size
    assert s.eval_interval == s.max_steps < d.max_steps  # evaluated at its end, like the default
