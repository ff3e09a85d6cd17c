"""Data parallelism on CPU: `torchrun --nproc_per_node=2` with gloo against one process.

DDP with 2 ranks of micro batch b must train exactly like one process with micro batch 2b (fp32):
same losses, gradient norms and weights. Checkpoints are rank-independent, so a run saved at one
world size resumes at another and continues the same curve.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_overrides, wait_for_lines
from safetensors.torch import load_file

from trainer import checkpoint as ckpt_io
from trainer.distributed import first_host, launcher_env, rendezvous_address

ENV = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
ENV |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def launch(overrides: list[str], run_dir: Path, nproc: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    if nproc == 1:
        cmd = [sys.executable]
    proc = subprocess.run([*cmd, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The whole model of a checkpoint; a sharded (FSDP) one is consolidated by scripts/export.py."""
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    if ckpt_io.is_sharded(ckpt):
        out = run_dir / f"exported_{step}.safetensors"
        proc = subprocess.run([sys.executable, str(REPO / "scripts/export.py"), str(ckpt), "--out", str(out)],
                              env=ENV, capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0 and "from the sharded checkpoint" in proc.stdout, proc.stderr
        return load_file(out)
    return load_file(ckpt / "model.safetensors")


def assert_same_run(a: dict[int, dict], b: dict[int, dict], steps, keys=("train/loss", "grad_norm", "val/loss")):
    worst = 0.0
    for step in steps:
        for key in keys:
            if key in a[step]:
                rel = abs(a[step][key] - b[step][key]) / abs(a[step][key])
                worst = max(worst, rel)
                assert rel < 1e-5, (step, key, a[step][key], b[step][key])
    return worst


def settings(tmp_path: Path, corpus: Path, **extra) -> list[str]:
    base = {"trainer.max_steps": 10, "trainer.log_interval": 1, "trainer.eval_interval": 5,
            "trainer.ckpt_interval": 5, "trainer.keep_checkpoints": 3, "trainer.sample_tokens": 0}  # fmt: skip
    return tiny_overrides(tmp_path, corpus, {**base, **extra})


DEFAULT_LAUNCHES = {"one process": (1, []), "ddp": (2, []), "fsdp": (2, ["distributed=fsdp"])}


@pytest.fixture(scope="module")
def default_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("default-cache")  # the stdlib corpus, tokenised once for the three launches


@pytest.mark.parametrize("mode", DEFAULT_LAUNCHES)
def test_a_run_with_the_users_defaults_exits_0_with_its_sample(tmp_path, default_cache, mode):
    """The shipped defaults (stdlib corpus, model=nano, bf16, W&B auto, evaluation, checkpoint and the 300-token
    sample at the end), overriding only what the machine forces: fewer steps, and the cache in a temporary
    directory. Under FSDP the sample used to hang rank 0 on all-gathers from ranks that had left (exit 1)."""
    nproc, extra = DEFAULT_LAUNCHES[mode]
    run_dir = tmp_path / "run"
    launch([*extra, "trainer.max_steps=3", f"data.cache_dir={default_cache}"], run_dir, nproc)
    assert (run_dir / "sample.txt").read_text().strip()
    assert "val/loss" in records(run_dir)[3]
    assert ckpt_io.list_checkpoints(run_dir / "checkpoints")[-1].name == "step_00000003"


@pytest.mark.parametrize("accum", [1, 2])
def test_ddp_two_ranks_match_one_process_with_twice_the_batch(tmp_path, corpus_file, accum):
    launch(settings(tmp_path, corpus_file, **{"trainer.micro_batch_size": 8}), tmp_path / "one", 1)
    ddp = {"trainer.micro_batch_size": 4 // accum, "trainer.grad_accum_steps": accum}  # 2 ranks x 4 = 8
    launch([*settings(tmp_path, corpus_file, **ddp), "distributed=ddp"], tmp_path / "two", 2)
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert sorted(one) == sorted(two) and two[10]["tokens"] == one[10]["tokens"]
    # Evaluation reads micro_batch_size windows per rank, so val batches match only when accum is 1.
    keys = ("train/loss", "grad_norm", "val/loss") if accum == 1 else ("train/loss", "grad_norm")
    assert_same_run(one, two, range(1, 11), keys)
    two = weights(tmp_path / "two", 10)
    for name, w in weights(tmp_path / "one", 10).items():
        torch.testing.assert_close(two[name], w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("saved_with, resumed_with", [(1, 2), (2, 1)])
def test_resume_at_another_world_size_continues_the_curve(tmp_path, corpus_file, saved_with, resumed_with):
    micro = {1: 8, 2: 4}
    full = tmp_path / "full"
    launch(settings(tmp_path, corpus_file, **{"trainer.micro_batch_size": micro[saved_with]}), full, saved_with)
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_00000005", resumed / "checkpoints" / "step_00000005")
    overrides = settings(tmp_path, corpus_file, **{"trainer.micro_batch_size": micro[resumed_with]})
    launch([*overrides, "trainer.resume=auto"], resumed, resumed_with)
    a, b = records(full), records(resumed)
    assert sorted(b) == list(range(6, 11))
    assert_same_run(a, b, range(6, 11))


def test_launcher_environment(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    assert launcher_env() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert launcher_env() == (5, 8, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert launcher_env() == (3, 4, 3)  # torchrun / accelerate take precedence


def test_slurm_rendezvous_address_is_the_jobs_first_node():
    assert first_host("gpu[003-004,010],cpu01") == "gpu003"
    assert first_host("a01,b[1-2]") == "a01" and first_host("node7") == "node7"
    assert first_host("rack[2-3]-gpu,x") == "rack2-gpu"
    env = {"SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_JOB_ID": "123456", "SLURM_PROCID": "3"}
    assert rendezvous_address(env) == {"MASTER_ADDR": "gpu003", "MASTER_PORT": str(20000 + 123456 % 40000)}
    assert rendezvous_address({**env, "RANK": "3"})["MASTER_ADDR"] == "127.0.0.1"  # torchrun set the rest


def test_slurm_tasks_without_torchrun_train_together(tmp_path, corpus_file):
    """submitit's SLURM tasks (and bare srun) start one process per GPU with no torchrun: two processes with
    only SLURM's variables join one process group and log one run, as DDP with 2 ranks does."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env |= {"SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": str(os.getpid()),
            "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    args = [sys.executable, str(REPO / "train.py"), *tiny_overrides(tmp_path, corpus_file, {"trainer.max_steps": 4}),
            f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    procs = [subprocess.Popen(args, cwd=REPO, env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]  # fmt: skip
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "(ddp, 2 ranks)" in outputs[0] and "done: step 4" in outputs[0]


def test_sigterm_to_the_launcher_leaves_a_loadable_checkpoint(tmp_path, corpus_file):
    import signal

    overrides = settings(tmp_path, corpus_file, **{"trainer.max_steps": 100000, "trainer.eval_interval": 100000,
                                                   "trainer.ckpt_interval": 100000, "trainer.log_interval": 5,
                                                   "trainer.micro_batch_size": 4})  # fmt: skip
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_lines(run_dir / "metrics.jsonl", 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "SIGTERM at step" in out, out[-3000:]
    (ckpt,) = ckpt_io.list_checkpoints(run_dir / "checkpoints")
    state = ckpt_io.load_state(ckpt)
    assert state["step"] > 0 and (ckpt / "model.safetensors").exists()


FSDP_FP32 = ["distributed=fsdp", "distributed.param_dtype=fp32"]  # fp32 for an exact comparison


def test_fsdp_matches_ddp(tmp_path, corpus_file):
    # with accumulation: its last micro-step is what an unaccumulated step does, the first skips the reduction
    accum = 2
    batch = {"trainer.micro_batch_size": 4 // accum, "trainer.grad_accum_steps": accum}
    launch([*settings(tmp_path, corpus_file, **batch), "distributed=ddp"], tmp_path / "ddp", 2)
    launch([*settings(tmp_path, corpus_file, **batch), *FSDP_FP32], tmp_path / "fsdp", 2)
    ddp, fsdp = records(tmp_path / "ddp"), records(tmp_path / "fsdp")
    assert sorted(ddp) == sorted(fsdp)
    assert_same_run(ddp, fsdp, range(1, 11))  # includes grad_norm: the sharded norm equals the whole one
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step_00000010"
    assert ckpt_io.is_sharded(ckpt) and len(list((ckpt / "sharded").glob("*.distcp"))) == 2  # a file per rank
    assert not (ckpt / "model.safetensors").exists()
    sample = [sys.executable, str(REPO / "scripts/sample.py"), str(tmp_path / "fsdp"), "--max-new-tokens", "5"]
    assert subprocess.run(sample, env=ENV, capture_output=True, text=True).returncode == 0  # reads the shards
    exported = weights(tmp_path / "fsdp", 10)  # once: each call runs scripts/export.py
    for name, w in weights(tmp_path / "ddp", 10).items():
        torch.testing.assert_close(exported[name], w, rtol=1e-5, atol=1e-6)
    assert {"config.yaml", "metrics.jsonl", "checkpoints"} <= {p.name for p in (tmp_path / "fsdp").iterdir()}


@pytest.mark.parametrize("saved_with, resumed_with", [(2, 1), (1, 2)])
def test_fsdp_resume_at_another_world_size(tmp_path, corpus_file, saved_with, resumed_with):
    micro = {1: 8, 2: 4}
    full = tmp_path / "full"
    launch([*settings(tmp_path, corpus_file, **{"trainer.micro_batch_size": micro[saved_with]}), *FSDP_FP32],
           full, saved_with)  # fmt: skip
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_00000005", resumed / "checkpoints" / "step_00000005")
    overrides = settings(tmp_path, corpus_file, **{"trainer.micro_batch_size": micro[resumed_with]})
    launch([*overrides, *FSDP_FP32, "trainer.resume=auto"], resumed, resumed_with)
    assert_same_run(records(full), records(resumed), range(6, 11))


@pytest.mark.parametrize("strategy", ["none", "ddp"])
def test_sharded_checkpoint_resumes_without_fsdp(tmp_path, corpus_file, strategy):
    """An FSDP run saved with 2 ranks continues on one process (or under DDP) from its shards."""
    overrides = settings(tmp_path, corpus_file, **{"trainer.micro_batch_size": 4})
    full = tmp_path / "full"
    launch([*overrides, *FSDP_FP32], full, 2)
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_00000005", resumed / "checkpoints" / "step_00000005")
    if strategy == "none":
        overrides = settings(tmp_path, corpus_file, **{"trainer.micro_batch_size": 8})
    launch([*overrides, f"distributed={strategy}", "trainer.resume=auto"], resumed, 2 if strategy == "ddp" else 1)
    assert_same_run(records(full), records(resumed), range(6, 11))
    for name, w in weights(full, 10).items():
        torch.testing.assert_close(weights(resumed, 10)[name], w, rtol=1e-5, atol=1e-6)


def test_whole_checkpoint_is_refused_under_fsdp_in_one_line(tmp_path, corpus_file):
    overrides = settings(tmp_path, corpus_file, **{"trainer.max_steps": 5})
    launch(overrides, tmp_path / "run", 1)
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, *FSDP_FP32, "trainer.max_steps=10",
           "trainer.resume=auto", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "distributed=ddp or distributed=none" in errors[0]


def test_fsdp_bf16_mixed_precision_trains(tmp_path, corpus_file):
    overrides = settings(tmp_path, corpus_file, **{"trainer.micro_batch_size": 4, "trainer.precision": "bf16"})
    launch([*overrides, "distributed=fsdp"], tmp_path / "run", 2)  # bf16 parameters, fp32 reduction
    r = records(tmp_path / "run")
    assert r[10]["val/loss"] < r[0]["val/loss"]


@pytest.mark.parametrize("strategy", [["distributed=ddp"], FSDP_FP32])
def test_activation_checkpointing_under_both_wrappers(tmp_path, corpus_file, strategy):
    overrides = [*settings(tmp_path, corpus_file, **{"trainer.micro_batch_size": 4, "trainer.max_steps": 6}), *strategy]
    launch(overrides, tmp_path / "plain", 2)
    launch([*overrides, "trainer.activation_checkpointing=true"], tmp_path / "ac", 2)
    assert_same_run(records(tmp_path / "plain"), records(tmp_path / "ac"), range(1, 7))


@pytest.mark.parametrize("strategy", [["distributed=ddp"], FSDP_FP32])
def test_compile_under_both_wrappers(tmp_path, corpus_file, strategy):
    overrides = [*settings(tmp_path, corpus_file, **{"trainer.micro_batch_size": 4, "trainer.max_steps": 6}), *strategy]
    launch(overrides, tmp_path / "eager", 2)
    launch([*overrides, "trainer.compile=true"], tmp_path / "compiled", 2)
    assert_same_run(
        records(tmp_path / "eager"), records(tmp_path / "compiled"), range(1, 7), ("train/loss", "grad_norm")
    )


@pytest.fixture
def one_rank_group():
    """A single-process gloo group, so that FSDP and torch.distributed.checkpoint run in this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_sharded_save_is_atomic_and_reloads_whole(tmp_path, one_rank_group):
    from torch.distributed.fsdp import fully_shard

    from models.minigpt import GPTConfig, MiniGPT
    from trainer.distributed import Dist

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)
    model = fully_shard(MiniGPT(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (2, 16))
    model(x, x)[1].backward()
    optimizer.step()
    root, d = tmp_path / "checkpoints", Dist(strategy="fsdp")

    def crash_after_the_shards(directory):
        ckpt_io.save_sharded(directory, model, optimizer)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt_io.save_checkpoint(root, 5, crash_after_the_shards, d, keep=2)
    assert list(root.iterdir()) == []  # neither a half-written step nor its temporary directory

    def write(directory):
        ckpt_io.save_sharded(directory, model, optimizer)
        torch.save({"step": 5}, directory / "state.pt")

    ckpt = ckpt_io.save_checkpoint(root, 5, write, d, keep=2)
    assert ckpt_io.list_checkpoints(root) == [ckpt] and ckpt_io.is_sharded(ckpt)
    whole = MiniGPT(config)
    ckpt_io.load_weights(whole, ckpt)  # shards into a plain model
    for name, p in model.state_dict().items():
        torch.testing.assert_close(whole.state_dict()[name], p.full_tensor(), rtol=0, atol=0)


STATS_PREFIXES = ("grad/", "param/", "update/", "opt/")


@pytest.mark.parametrize("optimizer", ["adamw", "lion"])
def test_statistics_under_fsdp_describe_the_whole_model(tmp_path, corpus_file, optimizer):
    """Per-layer and optimizer-state statistics of an FSDP run equal those of one process."""
    extra = {"trainer.max_steps": 10, "trainer.stats_interval": 5, "optimizer": optimizer}
    launch(settings(tmp_path, corpus_file, **{**extra, "trainer.micro_batch_size": 8}), tmp_path / "one", 1)
    launch([*settings(tmp_path, corpus_file, **{**extra, "trainer.micro_batch_size": 4}), *FSDP_FP32],
           tmp_path / "fsdp", 2)  # fmt: skip
    one, fsdp = records(tmp_path / "one"), records(tmp_path / "fsdp")
    for step in (5, 10):
        keys = [k for k in one[step] if k.startswith(STATS_PREFIXES) and not k.endswith("/by_layer")]
        assert len(keys) > 40 and set(keys) <= set(fsdp[step])
        for key in keys:
            a, b = one[step][key], fsdp[step][key]
            if key.endswith("/median"):  # from a histogram: the same bin, or the next one over rounding
                assert abs(math.log10(a / b)) <= 1 / 16 + 1e-9, (step, key, a, b)
            elif "ratio_log10" in key:
                assert abs(a - b) < 1e-4, (step, key, a, b)
            elif any(word in key for word in ("agreement", "fraction", "flip_rate")):
                # Sign counts: the attention key bias's gradient is rounding noise (it cannot change the
                # loss), so the signs of its 2 x 32 elements (0.2% of the model) may differ.
                assert abs(a - b) <= 2.5e-3, (step, key, a, b)
            else:
                assert abs(a - b) <= 1e-4 * abs(a) + 1e-7, (step, key, a, b)
