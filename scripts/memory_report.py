"""Optimizer-state bytes per parameter for every optimizer, measured after a real step, beside theory.

    python scripts/memory_report.py                     # model=nano
    python scripts/memory_report.py model=gpt2          # GPT-2 small (takes a minute on CPU)
    python scripts/memory_report.py --optimizers adamw,lion,adamw8bit

Positional arguments are Hydra overrides as for train.py (only the model group matters). Prints one
JSON line per optimizer, then a table.
"""

from __future__ import annotations

import argparse
import json

import torch

from models.minigpt import MiniGPT
from optim.builder import load_all
from optim.memory import state_report
from trainer.build import model_config
from trainer.entry.cli import compose_config

VARIANTS = {"adamw+lookahead": ("adamw", ["optimizer.lookahead.k=5"])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--optimizers", default="", help="comma-separated names (default: all)")
    parser.add_argument("--vocab", type=int, default=256, help="vocabulary size when model.vocab_size is null")
    args = parser.parse_args(argv)
    names = args.optimizers.split(",") if args.optimizers else [*sorted(load_all()), *VARIANTS]
    rows = []
    for name in names:
        base, extra = VARIANTS.get(name, (name, []))
        cfg = compose_config([*args.overrides, f"optimizer={base}", *extra])
        torch.manual_seed(0)
        model = MiniGPT(model_config(cfg.model, args.vocab))
        report = {"optimizer": name, **state_report(model, cfg.optimizer)}
        print(json.dumps(report), flush=True)
        rows.append(report)
    print(f"\n{'optimizer':<20} {'measured B/param':>17} {'theory B/param':>15} {'diff':>7}")
    for r in rows:
        diff = r["measured_per_param"] / r["theory_per_param"] - 1 if r["theory_per_param"] else 0.0
        print(f"{r['optimizer']:<20} {r['measured_per_param']:>17.3f} {r['theory_per_param']:>15.3f} {diff:>7.2%}")


if __name__ == "__main__":
    main()
