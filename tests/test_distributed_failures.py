"""Failures under `torchrun --nproc_per_node=2` (gloo on CPU), injected by tests/fail_on_rank.py.

A rank that fails says so in one line with its rank and error, the other ranks exit on their own at
once (not at torchrun's SIGKILL, nor at the collective timeout), and no process is left behind. With
`--max-restarts`, the restarted workers continue from the newest checkpoint and log the same losses as
an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, make_corpus, tiny_overrides

from trainer.entry.run import restarts_share_the_store

ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in ("WANDB_MODE", "RANK", "WORLD_SIZE", "LOCAL_RANK") and not k.startswith(("FAIL_", "TORCHELASTIC_"))
}
ENV |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
WRAPPER = REPO / "tests" / "fail_on_rank.py"
# torchrun (torch >= 2.5) shares its rendezvous TCPStore with the workers and keeps it across restarts, so
# restarted workers can read the failed attempt's addresses and hang in init_process_group (pytorch#135712).
# With this set, each rendezvous round gets a fresh store: part of the launch recipe for --max-restarts.
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def settings(tmp: Path, corpus: Path) -> list[str]:
    extra = {"trainer.max_steps": 10, "trainer.log_interval": 1, "trainer.eval_interval": 5,
             "trainer.ckpt_interval": 5, "trainer.keep_checkpoints": 3, "trainer.sample_tokens": 0,
             "trainer.micro_batch_size": 4, "distributed": "ddp"}  # fmt: skip
    return tiny_overrides(tmp, corpus, extra)


def launch(cmd: list[str], tmp: Path, env: dict | None = None, timeout: float = 150) -> tuple[int, str, float]:
    """Run a launcher to the end: (exit code, stdout and stderr together, the time.time() it ended)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env={**ENV, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun; its workers run in sessions of their own
        for pid in processes_mentioning(str(tmp)):
            os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"still running after {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out, time.time()


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (a test's unique temporary path)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:  # exited while we looked
            continue
    return found


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_failing_rank_is_named_and_every_rank_exits(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus())
    run_dir = tmp_path / "run"
    cmd = [*TORCHRUN, str(WRAPPER), *settings(tmp_path, corpus), f"hydra.run.dir={run_dir}"]
    code, out, ended = launch(cmd, tmp_path, {"FAIL_RANK": "1", "FAIL_AT_STEP": "7"})

    assert code != 0, out[-3000:]
    # One line names the failed rank and its error; rank 0 says it stopped because of another rank.
    failed = [line for line in out.splitlines() if "rank 1 failed: RuntimeError: injected failure at step 7" in line]
    assert failed, out[-4000:]
    assert "rank 0 stopped: another rank failed or exited" in out and "rank 0 failed" not in out, out[-4000:]
    # Rank 0 exits by itself when its next collective finds the peer gone, about a second after rank 1
    # failed (more on a loaded machine), not at torchrun's SIGKILL 30 s after its SIGTERM, nor at the
    # 30-minute collective timeout.
    (raised,) = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("fail_on_rank: raising at")]
    assert ended - raised < 20, f"the launcher ended {ended - raised:.1f} s after rank 1 failed"
    assert "SIGKILL" not in out and "exitcode  : -9" not in out, out[-4000:]
    assert "step 5: checkpoint" in (run_dir / "train.log").read_text()  # it did fail mid-training
    deadline = time.monotonic() + 10
    while processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_mentioning(str(tmp_path))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """(temporary directory, corpus, metrics) of a 2-rank run that nothing interrupts."""
    tmp = tmp_path_factory.mktemp("elastic")
    corpus = tmp / "corpus.txt"
    corpus.write_text(make_corpus())
    run_dir = tmp / "uninterrupted"
    code, out, _ = launch([*TORCHRUN, str(REPO / "train.py"), *settings(tmp, corpus), f"hydra.run.dir={run_dir}"], tmp)
    assert code == 0, out[-3000:]
    return tmp, corpus, records(run_dir)


@pytest.mark.parametrize(
    "fail_at, resume",
    [
        (8, ["trainer.resume=auto"]),  # the README's recipe
        (8, []),  # a restart continues from the run directory's newest checkpoint even without it
        (3, []),  # failed before the first checkpoint: the restart trains again from step 0
    ],
)
def test_elastic_restart_resumes_from_the_last_checkpoint(uninterrupted, fail_at, resume):
    tmp, corpus, reference = uninterrupted
    run_dir = tmp / f"elastic_{fail_at}_{len(resume)}"
    cmd = [*TORCHRUN, "--max-restarts=1", str(WRAPPER), *settings(tmp, corpus), *resume, f"hydra.run.dir={run_dir}"]
    fail = {"FAIL_RANK": "1", "FAIL_AT_STEP": str(fail_at), "FAIL_ON_ATTEMPT": "0"}
    code, out, _ = launch(cmd, run_dir, {**ELASTIC_ENV, **fail})

    assert code == 0, out[-4000:]
    assert f"rank 1 failed: RuntimeError: injected failure at step {fail_at}" in out  # the first attempt failed
    log = (run_dir / "train.log").read_text()  # both attempts append to it
    if fail_at > 5:
        assert f"resumed from {run_dir / 'checkpoints' / 'step_00000005'} at step 5" in log, log
    else:
        assert "resumed from" not in log and "elastic restart 1: no checkpoint" in log, log
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in log  # set: no warning
    assert f"done: step 10, val loss {reference[-1]['val/loss']:.4f}" in log
    got = records(run_dir)
    assert [r["step"] for r in got] == [r["step"] for r in reference] == list(range(11))  # each step once
    for a, b in zip(reference, got, strict=True):
        for key in ("train/loss", "grad_norm", "val/loss"):
            if key in a:
                assert abs(b[key] - a[key]) <= 1e-5 * abs(a[key]), (a["step"], key, a[key], b[key])


def test_restarts_through_torchruns_shared_store_are_warned_about():
    shared = {"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"}  # torchrun's default
    assert restarts_share_the_store(shared)
    assert not restarts_share_the_store({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"})  # the variable set
    assert not restarts_share_the_store({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"})
    assert not restarts_share_the_store({})  # not under torchrun
