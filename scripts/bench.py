"""Training throughput of a config: prints one JSON line with tokens/s and ms/step.

    python scripts/bench.py                                # the default (model=nano, bf16) on this machine
    python scripts/bench.py model=gpt2 trainer.micro_batch_size=8 --steps 20
    python scripts/bench.py trainer.precision=fp32 --steps 50 --warmup 10

Positional arguments are the same Hydra overrides train.py takes. Only optimizer steps are timed
(data loading included, evaluation and checkpoints not); the first --warmup steps are not timed.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from trainer.entry.cli import scratch_run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, caches)")
    args = parser.parse_args(argv)
    run = scratch_run(args.overrides)

    from trainer.loop import optimizer_step, step_context
    from trainer.runtime import device_sync

    t = run.cfg.trainer
    sc = step_context(run, guarded=False)  # the loop's step, without the anomaly guard's per-step read
    for i in range(args.warmup):
        optimizer_step(run, sc, i + 1)
    device_sync(run.device)
    start = time.perf_counter()
    for i in range(args.steps):
        loss, _ = optimizer_step(run, sc, args.warmup + i + 1)
    loss.item()
    device_sync(run.device)
    elapsed = time.perf_counter() - start
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * run.seq_len
    tokens_per_s = args.steps * tokens_per_step / elapsed
    print(json.dumps({
        "overrides": args.overrides, "device": str(run.device), "precision": t.precision.value,
        "compile": t.compile, "threads": torch.get_num_threads(), "params": run.model.num_params(),
        "tokens_per_step": tokens_per_step, "steps": args.steps, "ms_per_step": round(1000 * elapsed / args.steps, 2),
        "tokens_per_s": round(tokens_per_s, 1),
        "achieved_tflops": round(tokens_per_s * run.model.flops_per_token(run.seq_len) / 1e12, 4),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
