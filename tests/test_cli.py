"""End to end through the command line: `python train.py ...` in a subprocess, bad input, signals,
and the sample and bench scripts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_corpus, tiny_overrides, wait_for_lines

ENV = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"} | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def cli(*args: str, script: str = "train.py", timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """One small end-to-end run, W&B offline: (tmp dir, corpus, run dir)."""
    tmp = tmp_path_factory.mktemp("e2e")
    corpus = tmp / "corpus.txt"
    corpus.write_text(make_corpus())
    run_dir = tmp / "run"
    overrides = tiny_overrides(tmp, corpus, {"logger.wandb.mode": "offline", "trainer.progress": "true"})
    proc = cli(*overrides, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, corpus, run_dir


def test_end_to_end_run_writes_the_run_directory(trained):
    _, _, run_dir = trained
    assert (run_dir / "config.yaml").read_text().startswith("model:")
    assert (run_dir / ".hydra" / "overrides.yaml").exists()
    recs = records(run_dir)
    assert [r["step"] for r in recs] == [0, 5, 10, 15, 20]
    assert {"train/loss", "lr", "grad_norm", "tokens_per_s", "tokens"} <= recs[-1].keys()
    assert {"val/loss", "val/ppl"} <= recs[-1].keys() and "val/loss" in recs[2]
    assert recs[-1]["val/loss"] < recs[0]["val/loss"]
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step_00000010", "step_00000020"]
    assert (ckpts[-1] / "model.safetensors").stat().st_size > 0
    assert (run_dir / "sample.txt").read_text()
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))


def test_default_corpus_trains_through_the_cli(tmp_path):
    """The default data (stdlib sources, byte tokenizer) with a tiny model, no download involved."""
    run_dir = tmp_path / "run"
    proc = cli("model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
               "trainer.max_steps=4", "trainer.eval_steps=1", "trainer.micro_batch_size=4",
               "trainer.progress=false", "logger.wandb.mode=disabled", f"data.cache_dir={tmp_path / 'cache'}",
               f"hydra.run.dir={run_dir}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    train_tokens = re.search(r"data: ([\d,]+) train", proc.stdout).group(1)
    assert int(train_tokens.replace(",", "")) > 10_000_000  # the real stdlib corpus, not a stand-in
    assert records(run_dir)[-1]["step"] == 4


BAD_INPUT = {
    "unknown group option": (["optimizer=adamm"], "optimizer/adamm"),
    "misspelt key": (["trainer.max_stpes=5"], "max_stpes"),
    "wrong type": (["trainer.max_steps=many"], "max_steps"),
    "lr <= 0": (["optimizer.lr=0"], "optimizer.lr"),
    "betas outside [0, 1)": (["optimizer.betas=[0.9,1.0]"], "optimizer.betas"),
    "grad_accum_steps < 1": (["trainer.grad_accum_steps=0"], "grad_accum_steps"),
    "block_size larger than the model allows": (["data.seq_len=4096"], "model.block_size"),
    "missing data path": (["data=text", "data.path=/no/such/file.txt"], "does not exist"),
    "lookahead k < 1": (["optimizer=lamb", "optimizer.lookahead.k=0"], "optimizer.lookahead.k"),
    "field the optimizer lacks": (["optimizer=lion", "optimizer.eps=1e-8"], "eps"),
    "an infinite lr": (["optimizer.lr=inf"], "optimizer.lr=inf must be finite"),
    "a nan in a tuple": (["optimizer.betas=[0.9,nan]"], "must be finite"),
    "a seed outside 32 bits": (["trainer.seed=4294967296"], "trainer.seed=4294967296 must be in [0, 2^32)"),
    "start over and resume": (["trainer.start_over=true", "trainer.resume=auto"], "drop one of them"),
}

BUILD_ERRORS = {  # found while building the run, before the first step
    "a model too big for memory": ({"model.vocab_size": 10**11}, "does not fit on cpu"),
    "a prompt the char tokenizer cannot encode": (
        {"tokenizer": "char", "trainer.sample_prompt": "'☃'"},
        "trainer.sample_prompt='☃': character '☃' is not in",
    ),
}


@pytest.mark.parametrize("case", list(BUILD_ERRORS))
def test_build_time_errors_fail_with_one_line(case, tmp_path, corpus_file):
    extra, needle = BUILD_ERRORS[case]
    proc = cli(*tiny_overrides(tmp_path, corpus_file, extra), f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # before any training


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_fails_with_one_line(case, tmp_path):
    overrides, needle = BAD_INPUT[case]
    proc = cli(*overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "run").exists()  # rejected before any work


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and needle in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_too_short_corpus_fails_with_one_line(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here\n")
    proc = cli("data=text", f"data.path={short}", f"data.cache_dir={tmp_path}/c", "trainer.progress=false",
               f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    assert_one_line_error(proc, "corpus too short")


def test_unavailable_hf_tokenizer_fails_with_one_line(tmp_path, corpus_file):
    proc = cli(*tiny_overrides(tmp_path, corpus_file, {"tokenizer": "hf", "tokenizer.name": "no-org/no-tokenizer"}),
               f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    assert_one_line_error(proc, "not available offline")


@pytest.mark.parametrize("change, needle", [("model.n_embd=64", "model shape"), ("tokenizer=char", "vocabulary")])
def test_resuming_an_incompatible_checkpoint_fails_with_one_line(trained, change, needle):
    tmp, corpus, run_dir = trained
    overrides = [o for o in tiny_overrides(tmp, corpus) if not o.startswith(change.split("=")[0] + "=")]
    proc = cli(*overrides, change, "trainer.resume=auto", f"hydra.run.dir={run_dir}")
    assert_one_line_error(proc, needle)


def test_sigterm_checkpoints_and_the_resumed_run_matches(tmp_path, corpus_file):
    """A real SIGTERM mid-run: one checkpoint, exit 143, and the resumed run's losses equal an uninterrupted
    run's. The stopped run is long (4000 steps), so that the signal lands mid-run on any machine; the resumed and
    the reference run both end 100 steps after the stop (a constant schedule's lr does not depend on
    max_steps), so the test does not train 8000 steps. One thread: two threads of a tiny model stall each other
    on a busy machine (a 40 s test took 430 s)."""
    extra = {"trainer.ckpt_interval": 100000, "trainer.eval_interval": 100000, "trainer.log_interval": 10,
             "schedule": "constant", "trainer.sample_tokens": 0}  # fmt: skip
    overrides = tiny_overrides(tmp_path, corpus_file, extra | {"trainer.max_steps": 4000})
    env = ENV | {"OMP_NUM_THREADS": "1"}
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={stopped}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for_lines(stopped / "metrics.jsonl", 4)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in out + err and "SIGTERM at step" in out
    ckpts = sorted((stopped / "checkpoints").iterdir())
    assert len(ckpts) == 1
    stop_step = int(ckpts[0].name.split("_")[1])
    assert 0 < stop_step < 4000

    shorter = tiny_overrides(tmp_path, corpus_file, extra | {"trainer.max_steps": stop_step + 100})
    run = lambda *args: subprocess.run([sys.executable, str(REPO / "train.py"), *shorter, *args], cwd=REPO, env=env,
                                       capture_output=True, text=True, timeout=300)  # noqa: E731  # fmt: skip
    resumed = run("trainer.resume=auto", f"hydra.run.dir={stopped}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    full_dir = tmp_path / "full"
    full = run(f"hydra.run.dir={full_dir}")
    assert full.returncode == 0, full.stderr[-2000:]
    after = {r["step"]: r["train/loss"] for r in records(stopped) if r["step"] > stop_step and "train/loss" in r}
    reference = {r["step"]: r["train/loss"] for r in records(full_dir) if r["step"] > stop_step and "train/loss" in r}
    assert len(after) >= 10 and after == reference


def test_sample_script_generates_from_a_run_directory(trained):
    _, _, run_dir = trained
    proc = cli(str(run_dir), "--prompt", "the cat", "--max-new-tokens", "30", "--temperature", "0",
               script="scripts/sample.py")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("the cat") and len(proc.stdout) > len("the cat") + 20
    again = cli(str(run_dir), "--prompt", "the cat", "--max-new-tokens", "30", "--temperature", "0",
                script="scripts/sample.py")  # fmt: skip
    assert again.stdout == proc.stdout  # greedy decoding is deterministic
    missing = cli(str(run_dir / "nope"), script="scripts/sample.py")
    assert_one_line_error(missing, "no checkpoint")


def test_bench_prints_one_json_line(tmp_path, corpus_file):
    proc = cli(*tiny_overrides(tmp_path, corpus_file), "--steps", "3", "--warmup", "1", script="scripts/bench.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["steps"] == 3 and result["tokens_per_step"] == 8 * 32
    assert result["tokens_per_s"] > 0 and result["ms_per_step"] > 0


@pytest.mark.parametrize("script", ["scripts/bench.py", "scripts/bench_stats.py", "scripts/lr_find.py"])
def test_step_scripts_report_a_too_short_corpus_in_one_line(tmp_path, script):
    """Found while building the run, not while composing the config: trainer.entry.cli.scratch_run reports it."""
    short = tmp_path / "short.txt"
    short.write_text("only a few words here\n")
    proc = cli("data=text", f"data.path={short}", f"data.cache_dir={tmp_path}/c", script=script)
    assert_one_line_error(proc, "corpus too short")
