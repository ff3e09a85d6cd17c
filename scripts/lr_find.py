"""LR range test (Smith 2015, fastai's lr_find): ramp the lr exponentially, watch the loss, suggest an lr.

    python scripts/lr_find.py                                     # the default config (optimizer=adamw)
    python scripts/lr_find.py optimizer=lion model=gpt2 --start 1e-6 --end 1 --steps 200
    python scripts/lr_find.py optimizer=muon --out /tmp/lr_muon

Positional arguments are the same Hydra overrides train.py takes; the run is built as scripts/bench.py
builds it. Every param group's lr is the configured lr times one factor, so groups keep their ratios; the
lrs shown are optimizer.lr's. Stops when the smoothed loss exceeds 4x its minimum or is non-finite.
Writes lr_find.png and lr_find.json to --out (default runs/lr_find/<optimizer>-<timestamp>) and prints
one JSON line: `suggested_lr` (steepest descent of the smoothed loss in log lr) and `min_loss_lr_div10`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from trainer.errors import exit_with_error

DIVERGE = 4.0  # stop when the smoothed loss exceeds this times its minimum


def smooth(losses, beta: float = 0.98) -> np.ndarray:
    """Exponential moving average with bias correction (a constant series stays constant)."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return np.array(out)


def suggest(lrs, losses) -> dict:
    """Suggestions from a (smoothed) loss curve: the lr of steepest descent (most negative d loss / d log lr,
    before the minimum) and the lr of the minimum loss divided by 10."""
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    n = int(np.nanargmin(losses)) + 1  # the descent: up to the minimum
    steepest = lrs[int(np.argmin(np.gradient(losses[:n], np.log(lrs[:n]))))] if n >= 2 else lrs[0]
    return {
        "steepest_lr": float(steepest),
        "min_loss_lr": float(lrs[n - 1]),
        "min_loss_lr_div10": float(lrs[n - 1] / 10),
    }


def plot(path: Path, lrs, raw, smoothed, found: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(lrs[: len(raw)], raw, alpha=0.35, lw=1, label="loss")
    ax.plot(lrs[: len(smoothed)], smoothed, lw=2, label="smoothed")
    for key, label, style in (
        ("steepest_lr", "steepest (suggested)", "-"),
        ("min_loss_lr_div10", "min loss / 10", ":"),
    ):
        ax.axvline(found[key], color="red", ls=style, lw=1, label=f"{label}: {found[key]:.2e}")
    ax.plot(found["steepest_lr"], np.interp(np.log(found["steepest_lr"]), np.log(lrs[: len(smoothed)]), smoothed),
            "ro")  # fmt: skip
    finite = np.asarray(raw)[np.isfinite(raw)]
    lo, hi = min(finite.min(), min(smoothed)), max(smoothed)  # raw spikes past the smoothed curve are cut
    pad = 0.1 * (hi - lo) or 0.1
    ax.set_ylim(lo - pad, hi + pad)
    ax.set(xscale="log", xlabel="learning rate (optimizer.lr)", ylabel="train loss", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    parser.add_argument("--start", type=float, default=1e-7, help="first lr")
    parser.add_argument("--end", type=float, default=10.0, help="last lr")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of the ramp (>= 10)")
    parser.add_argument("--beta", type=float, default=0.98, help="EMA factor of the loss smoothing")
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    args = parser.parse_args(argv)
    if not 0 < args.start < args.end or not math.isfinite(args.end):
        exit_with_error(f"need 0 < --start < --end (got --start {args.start:g} --end {args.end:g})")
    if args.steps < 10:
        exit_with_error(f"--steps must be at least 10 (got {args.steps})")
    if not 0 <= args.beta < 1:
        exit_with_error(f"--beta must be in [0, 1) (got {args.beta:g})")

    from tqdm import tqdm

    from trainer.entry.cli import scratch_run

    run = scratch_run(args.overrides)

    from trainer.loop import optimizer_step, step_context

    cfg = run.cfg
    ref = cfg.optimizer.lr
    sc = step_context(run, guarded=False)  # a diverging loss ends the sweep here, not the guard
    base = [g.get("initial_lr", g["lr"]) for g in run.optimizer.param_groups]  # the configured lrs
    lrs = args.start * (args.end / args.start) ** (np.arange(args.steps) / (args.steps - 1))
    raw, smoothed, avg, best, stopped = [], [], 0.0, math.inf, None
    bar = tqdm(total=args.steps, desc="lr_find", unit="step")
    for i, lr in enumerate(lrs):
        for group, b in zip(run.optimizer.param_groups, base, strict=True):
            group["lr"] = b * lr / ref
        loss, _ = optimizer_step(run, sc, i + 1)  # its schedule step is overridden by the next lr
        raw.append(loss.item())
        if not math.isfinite(raw[-1]):
            stopped = "non-finite loss"
            break
        avg = args.beta * avg + (1 - args.beta) * raw[-1]
        smoothed.append(avg / (1 - args.beta ** (i + 1)))
        best = min(best, smoothed[-1])
        bar.set_postfix(lr=f"{lr:.2e}", loss=f"{smoothed[-1]:.4f}", refresh=False)
        bar.update(1)
        if smoothed[-1] > DIVERGE * best:
            stopped = f"smoothed loss > {DIVERGE:g} x its minimum"
            break
    bar.close()
    if len(smoothed) < 2:
        exit_with_error(f"the loss was non-finite from the first steps (at lr {lrs[0]:.2e}): lower --start")

    found = suggest(lrs[: len(smoothed)], smoothed)
    name = cfg.optimizer.name
    out = args.out or Path("runs/lr_find") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    plot(out / "lr_find.png", lrs, raw, smoothed, found, f"LR range test: optimizer={name}")
    rule = "steepest descent of the smoothed loss (most negative d loss / d log lr)"
    summary = {"suggested_lr": found["steepest_lr"], "rule": rule, **found, "optimizer": name,
               "overrides": args.overrides, "start": args.start, "end": args.end, "steps": len(raw),
               "stopped": stopped, "out": str(out)}  # fmt: skip
    curve = {"lr": lrs[: len(raw)].tolist(), "loss": [x if math.isfinite(x) else None for x in raw],
             "smoothed": smoothed, "beta": args.beta}  # fmt: skip
    (out / "lr_find.json").write_text(json.dumps({**summary, **curve}, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
