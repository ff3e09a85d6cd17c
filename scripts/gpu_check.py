"""The Python half of scripts/gpu_check.sh: the flash-attention probe, and each check's JSON line.

python scripts/gpu_check.py flash                      # is the flash kernel what the model's attention runs?
python scripts/gpu_check.py report NAME RC SECONDS DIR # one JSON line for check NAME from its outputs in DIR
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def flash() -> dict:
    """Profile one forward+backward of a GPT-2-shaped block stack under the trainer's bf16 autocast and look for
    flash-attention kernels among the CUDA kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from models.minigpt import GPTConfig, MiniGPT
    from trainer.config import Precision
    from trainer.runtime import Autocast

    device = torch.device("cuda")
    model = MiniGPT(GPTConfig(vocab_size=50304, block_size=1024, n_layer=2, n_head=12, n_embd=768)).to(device)
    x = torch.randint(50304, (4, 1024), device=device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with Autocast(Precision.bf16, device):
            _, loss = model(x, x)
        loss.backward()
        torch.cuda.synchronize()
    kernels = sorted({e.key for e in prof.key_averages() if "flash" in e.key.lower() or "fmha" in e.key.lower()})
    return {"ok": bool(kernels), "flash_kernels": kernels[:4]}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in records(run_dir) if "train/loss" in r}


def last_json(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def trained(run_dir: Path, strategy: str | None = None) -> dict:
    """A short run's verdict: finite, falling train losses and a finite final val loss."""
    train = losses(run_dir)
    val = [r["val/loss"] for r in records(run_dir) if "val/loss" in r]
    steps = sorted(train)
    ok = all(math.isfinite(v) for v in train.values()) and train[steps[-1]] < train[steps[0]] and math.isfinite(val[-1])
    out = {"ok": ok, "first_loss": round(train[steps[0]], 4), "last_loss": round(train[steps[-1]], 4),
           "val_loss": round(val[-1], 4)}  # fmt: skip
    if strategy is not None:
        out["ok"] = ok and f"({strategy}, 1 ranks)" in (run_dir / "train.log").read_text()
    return out


def report(name: str, rc: int, seconds: int, out_dir: Path) -> dict:
    out, err = out_dir / f"{name}.out", out_dir / f"{name}.err"
    result = {"check": name, "seconds": seconds}
    if rc != 0:
        why = f"timed out after {seconds} s" if rc == 124 else (err.read_text().strip().splitlines() or ["?"])[-1]
        return {**result, "ok": False, "rc": rc, "error": why[-300:]}
    if name == "bench_gpt2":
        b = last_json(out)[-1]
        return {**result, "ok": True, **{k: b[k] for k in ("tokens_per_s", "ms_per_step", "mfu", "achieved_tflops",
                                                              "precision", "compile", "first_step_s")},
                "mfu_target": 0.5, "meets_target": (b["mfu"] or 0) >= 0.5}  # fmt: skip
    if name == "flash_sdpa":
        return {**result, **last_json(out)[-1]}
    if name == "fp16_gradscaler":
        import torch

        ckpt = sorted((out_dir / "fp16" / "checkpoints").glob("step_*"))[-1]
        scale = torch.load(ckpt / "state.pt", weights_only=True)["scaler"]["scale"]
        verdict = trained(out_dir / "fp16")
        return {**result, **verdict, "ok": verdict["ok"] and math.isfinite(scale) and scale > 0, "scaler_scale": scale}
    if name in ("ddp_nccl", "fsdp_nccl"):
        return {**result, **trained(out_dir / name.split("_")[0], name.split("_")[0])}
    if name == "gpt2_124m":
        rs = [r["tokens_per_s"] for r in records(out_dir / "g124") if "tokens_per_s" in r]
        mfu = [r["perf/mfu"] for r in records(out_dir / "g124") if "perf/mfu" in r]
        return {**result, **trained(out_dir / "g124"), "tokens_per_s": round(sorted(rs)[len(rs) // 2], 1),
                "mfu": round(sorted(mfu)[len(mfu) // 2], 4) if mfu else None}  # fmt: skip
    if name == "gpt2_124m_resume":
        full, resumed = losses(out_dir / "g124"), losses(out_dir / "g124r")
        common = sorted(s for s in resumed if s > 50 and s in full)
        diff = max(abs(resumed[s] - full[s]) / abs(full[s]) for s in common)
        return {**result, "ok": bool(common) and diff < 0.02, "steps_compared": len(common),
                "max_rel_loss_diff": round(diff, 5)}  # fmt: skip
    if name == "optimizers":
        lines = [r for r in last_json(out) if "optimizer" in r]  # scripts/bench_optimizers.py's lines
        ratios = {r["optimizer"]: r.get("vs_fused_adamw") for r in lines}
        return {**result, "ok": bool(lines), "ratio_vs_fused_adamw": ratios}
    return {**result, "ok": True}


def main(argv: list[str]) -> int:
    if argv[:1] == ["flash"]:
        print(json.dumps(flash()))
        return 0
    name, rc, seconds, out_dir = argv[1], int(argv[2]), int(argv[3]), Path(argv[4])
    try:
        result = report(name, rc, seconds, out_dir)
    except (OSError, ValueError, KeyError, IndexError) as e:  # outputs missing or not as expected
        result = {"check": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    print(json.dumps(result), flush=True)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
