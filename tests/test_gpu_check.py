"""scripts/gpu_check.sh, which cannot run here (no GPU): without CUDA it says so in one line; every command it would
run parses (its overrides compose into the config it means, its script flags exist); its reports judge outputs."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.entry.cli import compose_config

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHON": sys.executable, "WANDB_MODE": "disabled"}


def load(script: str):
    spec = importlib.util.spec_from_file_location(Path(script).stem, REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = load("scripts/gpu_check.py")


def dry_run() -> dict[str, list[str]]:
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=REPO, env=ENV, capture_output=True,
                          text=True, check=True)  # fmt: skip
    return {name: shlex.split(cmd) for name, cmd in (line.split("\t") for line in proc.stdout.splitlines())}


def overrides(argv: list[str]) -> list[str]:
    """The Hydra overrides of a command (hydra.* settings are Hydra's own, not the trainer's config)."""
    return [a for a in argv if "=" in a and not a.startswith(("-", "hydra."))]


def test_without_cuda_it_says_so_in_one_line_and_exits_0():
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    assert json.loads(line)["skipped"].startswith("no CUDA device")


def test_every_check_has_a_command_and_they_parse():
    commands = dry_run()
    assert list(commands) == ["bench_gpt2", "flash_sdpa", "fp16_gradscaler", "ddp_nccl", "fsdp_nccl", "gpt2_124m",
                              "gpt2_124m_resume", "optimizers"]  # fmt: skip
    configs = {}
    for name, argv in commands.items():
        script = next(a for a in argv if a.endswith(".py"))
        assert (REPO / script).exists(), script
        if script in ("train.py", "scripts/bench.py"):
            configs[name] = compose_config(overrides(argv))  # raises on any bad override
    bench = configs["bench_gpt2"]
    assert (bench.model.n_layer, bench.model.n_embd, bench.model.block_size, bench.model.vocab_size) == (
        12, 768, 1024, 50304)  # fmt: skip
    assert (bench.trainer.precision.value, bench.trainer.compile, bench.trainer.device.value) == ("bf16", True, "cuda")
    assert configs["fp16_gradscaler"].trainer.precision.value == "fp16"
    assert configs["ddp_nccl"].distributed.strategy == "ddp" and configs["fsdp_nccl"].distributed.strategy == "fsdp"
    assert all(configs[n].distributed.backend == "nccl" for n in ("ddp_nccl", "fsdp_nccl"))
    g = configs["gpt2_124m"]
    assert (g.trainer.max_steps, g.trainer.ckpt_interval, g.trainer.grad_accum_steps, g.tokenizer.kind) == (
        100, 50, 8, "byte")  # offline: the byte tokenizer at GPT-2's padded vocabulary  # fmt: skip
    assert configs["gpt2_124m_resume"].trainer.resume.endswith("g124/checkpoints/step_00000050")
    assert commands["ddp_nccl"][1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]


def test_script_flags_exist():
    commands = dry_run()
    bench = commands["bench_gpt2"]
    parser = load("scripts/bench.py").build_parser()
    parser.parse_args(bench[bench.index("scripts/bench.py") + 1 :])  # exits on an unknown flag
    opt = commands["optimizers"]
    help_text = subprocess.run([sys.executable, "scripts/bench_optimizers.py", "--help"], cwd=REPO, env=ENV,
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    for flag in (a for a in opt if a.startswith("--")):
        assert flag in help_text, flag
    assert commands["flash_sdpa"][-1] == "flash"


def write_run(run_dir: Path, losses: dict[int, float], strategy: str = "none") -> None:
    run_dir.mkdir(parents=True)
    lines = [{"step": s, "train/loss": v} for s, v in losses.items()] + [{"step": max(losses), "val/loss": 2.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run_dir / "train.log").write_text(f"[00:00:00] model: ... | global batch 8 x 128 tokens ({strategy}, 1 ranks)\n")


def test_reports_judge_the_outputs(tmp_path):
    write_run(tmp_path / "ddp", {5: 3.0, 10: 2.5, 20: 2.0}, "ddp")
    assert gpu_check.report("ddp_nccl", 0, 9, tmp_path)["ok"]
    write_run(tmp_path / "fsdp", {5: 3.0, 10: 2.5, 20: 2.0}, "none")  # not sharded: the check fails
    assert not gpu_check.report("fsdp_nccl", 0, 9, tmp_path)["ok"]
    full = {s: 4.0 - s / 100 for s in range(10, 101, 10)}
    write_run(tmp_path / "g124", full)
    write_run(tmp_path / "g124r", {s: v * 1.001 for s, v in full.items() if s > 50})
    same = gpu_check.report("gpt2_124m_resume", 0, 30, tmp_path)
    assert same["ok"] and same["steps_compared"] == 5 and same["max_rel_loss_diff"] == pytest.approx(0.001)
    far = tmp_path / "far"
    write_run(far / "g124", full)
    write_run(far / "g124r", {s: v * 1.1 for s, v in full.items() if s > 50})
    assert not gpu_check.report("gpt2_124m_resume", 0, 30, far)["ok"]  # 10% off: not the same run continued
    (tmp_path / "optimizers.out").write_text('{"baseline": "x"}\n{"optimizer": "lion", "vs_fused_adamw": 1.2}\n')
    assert gpu_check.report("optimizers", 0, 5, tmp_path)["ratio_vs_fused_adamw"] == {"lion": 1.2}
    (tmp_path / "x.err").write_text("Traceback ...\nRuntimeError: CUDA out of memory\n")
    failed = gpu_check.report("x", 1, 5, tmp_path)
    assert not failed["ok"] and "out of memory" in failed["error"]
    assert gpu_check.report("x", 124, 50, tmp_path)["error"] == "timed out after 50 s"
