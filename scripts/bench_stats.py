"""The cost of watching: throughput with statistics and anomaly checks at their defaults against both off.

    python scripts/bench_stats.py                                   # model=nano on this machine
    python scripts/bench_stats.py model=gpt2 trainer.micro_batch_size=8 --repeats 5
    python scripts/bench_stats.py optimizer=lion trainer.stats_interval=50

Runs the loop's own pieces (train_step, the anomaly guard, the stats probe and its host read) over
segments of `trainer.stats_interval` steps, alternating "watched" (statistics once per segment, anomaly
checks every step, as `train.py` runs by default) and "plain" (neither) segments in one process, so
that both see the same machine state. Prints one JSON line per mode and one with the ratio of the
medians: the target is watched / plain >= 0.97.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from trainer.entry.cli import scratch_run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    parser.add_argument("--repeats", type=int, default=3, help="segments timed per mode")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    args = parser.parse_args(argv)
    run = scratch_run(args.overrides)

    from trainer.loop import optimizer_step, stats_probe, step_context
    from trainer.runtime import device_sync

    cfg, t = run.cfg, run.cfg.trainer
    interval = t.stats_interval or 100
    plain, guarded = step_context(run, guarded=False), step_context(run)
    probe = stats_probe(run)
    step_number = 0

    def segment(watched: bool, steps: int) -> float:
        nonlocal step_number
        device_sync(run.device)
        start = time.perf_counter()
        for _ in range(steps):
            step_number += 1
            watch = probe if watched and probe.wants(step_number, interval) else None
            loss, _ = optimizer_step(run, guarded if watched else plain, step_number, watch)
        if watched and probe.ready:
            probe.result()
        loss.item()  # the loop's log-step read
        device_sync(run.device)
        return time.perf_counter() - start

    segment(False, args.warmup)
    times = {"plain": [], "watched": []}
    for _ in range(args.repeats):
        for mode in ("plain", "watched"):
            step_number = 0  # each watched segment ends on a stats step
            times[mode].append(segment(mode == "watched", interval))
    tokens = interval * t.micro_batch_size * t.grad_accum_steps * run.seq_len
    rates = {mode: tokens / statistics.median(ts) for mode, ts in times.items()}
    for mode, rate in rates.items():
        print(json.dumps({"mode": mode, "overrides": args.overrides, "optimizer": cfg.optimizer.name,
                          "stats_interval": interval, "segments": args.repeats, "device": str(run.device),
                          "tokens_per_s": round(rate, 1)}))  # fmt: skip
    print(json.dumps({"ratio_watched_over_plain": round(rates["watched"] / rates["plain"], 4), "target": 0.97}))


if __name__ == "__main__":
    main()
