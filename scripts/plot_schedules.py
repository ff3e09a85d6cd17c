"""Plot every learning-rate schedule over one run into a single PNG (for the README).

python scripts/plot_schedules.py                         # docs/schedules.png, 1000 steps
python scripts/plot_schedules.py --steps 5000 --warmup 250 --out /tmp/s.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from optim.schedules import (
    SCHEDULES,
    ScheduleConfig,
    build_scheduler,
    lr_factor,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "schedules.png"))
    args = parser.parse_args(argv)
    fig, ax = plt.subplots(figsize=(9, 5))
    for name in SCHEDULES:
        cfg = ScheduleConfig(name=name, warmup_steps=args.warmup, min_lr_ratio=args.min_lr_ratio,
                             step_size=max(1, args.steps // 4), gamma=0.5)  # fmt: skip
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = build_scheduler(opt, cfg, args.steps)
        steps = list(range(args.steps + 1))
        ax.plot(steps, [lr_factor(sched, s) for s in steps], label=name, linewidth=1.6)
    ax.set_xlabel("step")
    ax.set_ylabel("lr / optimizer.lr")
    ax.set_title(f"schedule=NAME, warmup_steps={args.warmup}, min_lr_ratio={args.min_lr_ratio}, "
                 f"max_steps={args.steps}")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
