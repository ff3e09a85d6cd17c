"""Time `optimizer.step()` for every optimizer in the zoo on GPT-2-small-sized parameters.

    python scripts/bench_optimizers.py                       # model=gpt2 shapes, every optimizer
    python scripts/bench_optimizers.py --optimizers lion,lamb --steps 10
    python scripts/bench_optimizers.py --model nano           # quick

Each optimizer is built from its YAML defaults and stepped on the same fixed random gradients. Prints
one JSON line per optimizer: ms per step and the ratio to torch's fastest AdamW (fused or foreach,
whichever was faster at the start), timed again right after each optimizer so that the ratio compares
two measurements taken side by side. Hand-written optimizers are also timed beside their reference package
(`ref_ms`, `vs_ref`). Sophia's figure is amortised: step() plus update_hessian() every k steps; the extra
forward/backward of its Hessian estimator is model cost and is not included.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable

import torch

from models.minigpt import MiniGPT
from optim.builder import BuildContext, build_optimizer, hook_every, load_all, param_groups
from trainer.build import model_config
from trainer.entry.cli import compose_config

VARIANTS = {"adamw+lookahead": ("adamw", ["optimizer.lookahead.k=5"])}


def references() -> dict[str, Callable]:
    """Reference implementations to time ours against: name -> (groups, cfg) -> optimizer."""
    refs: dict[str, Callable] = {}
    try:
        from lion_pytorch import Lion

        refs["lion"] = lambda groups, c: Lion(groups, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)
    except ImportError:
        pass
    try:
        import pytorch_optimizer as po

        # pytorch_optimizer's flags for the paper's LAMB (as in tests/test_optim_lion_lamb_adabelief.py)
        refs["lamb"] = lambda groups, c: po.Lamb(
            groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps, weight_decay=c.weight_decay, weight_decouple=False,
            adam=False, pre_norm=False, grad_averaging=True, rectify=False, adam_debias=True,
        )  # fmt: skip
        refs["adabelief"] = lambda groups, c: po.AdaBelief(
            groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps, weight_decay=c.weight_decay, weight_decouple=True,
            fixed_decay=False, rectify=False,
        )  # fmt: skip
        refs["adamw+lookahead"] = lambda groups, c: po.Lookahead(
            torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps, fused=True), k=5, alpha=0.5
        )
    except ImportError:
        pass
    try:
        import bitsandbytes as bnb

        refs["adamw8bit"] = lambda groups, c: bnb.optim.AdamW8bit(
            groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps, weight_decay=c.weight_decay
        )
    except ImportError:
        pass
    return refs


def time_steps(optimizer: torch.optim.Optimizer, steps: int, warmup: int, extra: Callable | None = None) -> float:
    for _ in range(warmup):
        optimizer.step()
    start = time.perf_counter()
    for i in range(steps):
        optimizer.step()
        if extra is not None:
            extra(i)
    return 1000 * (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", help="model group option (nano, gpt2, gpt2-medium)")
    parser.add_argument("--optimizers", default="", help="comma-separated names (default: all)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-references", action="store_true")
    args = parser.parse_args(argv)
    names = args.optimizers.split(",") if args.optimizers else [*sorted(load_all()), *VARIANTS]
    refs = {} if args.no_references else references()

    def config(name: str, extra: list[str] = ()):
        return compose_config([f"model={args.model}", f"optimizer={name}", *extra])

    base = config("adamw")
    torch.manual_seed(0)
    model = MiniGPT(model_config(base.model, 50257 if args.model.startswith("gpt2") else 256))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    n = model.num_params()
    ctx = BuildContext(torch.device("cpu"), global_batch=8, tokens_per_step=8 * base.model.block_size)

    def adamw_ms(impl: str) -> float:
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, **{impl: True})
        ms = time_steps(opt, args.steps, args.warmup)
        del opt
        gc.collect()
        return ms

    baseline = {impl: adamw_ms(impl) for impl in ("fused", "foreach")}
    fastest_impl = min(baseline, key=baseline.get)
    print(json.dumps({"baseline": "torch.optim.AdamW", "params": n, "threads": torch.get_num_threads(),
                      **{f"{k}_ms": round(v, 2) for k, v in baseline.items()}}), flush=True)  # fmt: skip

    for name in names:
        opt_name, extra = VARIANTS.get(name, (name, []))
        cfg = config(opt_name, extra).optimizer
        saved = [p.detach().clone() for p in model.parameters()]
        opt = build_optimizer(model, cfg, ctx)
        hook = None
        if hasattr(opt, "update_hessian"):
            k = hook_every(cfg)
            hook = lambda i, o=opt, k=k: o.update_hessian() if i % k == 0 else None  # noqa: E731
        ms = time_steps(opt, args.steps, args.warmup, hook)
        del opt
        gc.collect()
        fastest = adamw_ms(fastest_impl)  # timed right after, so load changes affect both alike
        result = {"optimizer": name, "ms_per_step": round(ms, 2), "adamw_ms": round(fastest, 2),
                  "vs_fastest_adamw": round(ms / fastest, 3)}  # fmt: skip
        if name in refs:
            with torch.no_grad():
                for p, s in zip(model.parameters(), saved, strict=True):
                    p.copy_(s)
            ref = refs[name](param_groups(model, cfg.weight_decay), cfg)
            ref_hook = None
            if hasattr(ref, "update_hessian"):
                k = hook_every(cfg)
                ref_hook = lambda i, o=ref, k=k: o.update_hessian() if i % k == 0 else None  # noqa: E731
            ref_ms = time_steps(ref, args.steps, args.warmup, ref_hook)
            result.update({"ref_ms": round(ref_ms, 2), "vs_ref": round(ms / ref_ms, 3)})
            del ref
            gc.collect()
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved, strict=True):
                p.copy_(s)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
