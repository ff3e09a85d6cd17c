"""Time `optimizer.step()` for every optimizer in the zoo on GPT-2-small-sized parameters, against fused AdamW.

    python scripts/bench_optimizers.py                        # model=gpt2 shapes, every optimizer
    python scripts/bench_optimizers.py --optimizers lion,lamb --steps 10
    python scripts/bench_optimizers.py --model nano            # quick
    python scripts/bench_optimizers.py --device cuda           # on a GPU
    python scripts/bench_optimizers.py --compile-times         # + cold and warm compile of each fused step

Each optimizer is built from its YAML defaults and stepped on the same fixed random gradients, side by
side with torch's fused AdamW on the same parameters: the two steps alternate (one of each, `--steps`
times, after `--warmup` of each), so a machine shared with other work slows both alike. Prints one JSON
line per optimizer: ms per step, AdamW's ms over the same rounds, and the ratio (or `error`, and the run
goes on). Optimizers with a fused step (optimizer.fused, optim/fused.py) are timed both ways (`--fused
both`, the default): `name` eager and `name+fused` compiled, whose line also gives `first_step_s` (the
compile, with whatever the Inductor cache held) and `max_abs_diff_vs_eager` (after --steps + --warmup
steps from the same start: 0 where the two are bit-identical). Sophia's figure is amortised: step() plus
update_hessian()'s time / k, k its hessian_interval (the estimator's forward/backward is model time and
is not counted).

`--compile-times` also runs each fused step in two fresh processes sharing a new, empty Inductor cache
directory: the first pays the cold compile, the second the warm one (`cold_s`, `warm_s`: the first
step's wall time, compile included). Hand-written optimizers are also timed beside their reference
package (`ref_ms`, `vs_ref`) with `--references`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from models.minigpt import MiniGPT
from optim import fused
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stepper(opt: torch.optim.Optimizer, cfg) -> Callable[[int], None]:
    """One step (i counts from 0); Sophia's includes update_hessian() every k steps, as the loop's hook
    (used where the weights matter; the timing adds update_hessian's own time / k instead)."""
    if not hasattr(opt, "update_hessian"):
        return lambda i: opt.step()
    k = hook_every(cfg)

    def step(i: int) -> None:
        opt.step()
        if i % k == 0:
            opt.update_hessian()

    return step


def side_by_side(step: Callable[[int], None], other: Callable[[int], None], steps: int, warmup: int,
                 device: torch.device) -> tuple[float, float, float]:  # fmt: skip
    """(first step s, ms per step, the other's ms per step), the two alternating step by step."""
    sync(device)
    start = time.perf_counter()
    step(0)
    sync(device)
    first = time.perf_counter() - start
    for i in range(1, warmup):
        step(i)
        other(i)
    spent = [0.0, 0.0]
    for i in range(warmup, warmup + steps):
        for k, fn in enumerate((step, other)):
            sync(device)
            start = time.perf_counter()
            fn(i)
            sync(device)
            spent[k] += time.perf_counter() - start
    return first, 1000 * spent[0] / steps, 1000 * spent[1] / steps


def compile_times(name: str, args: argparse.Namespace) -> dict:
    """Cold and warm first-step seconds of `name`'s fused step, in two fresh processes and a new cache dir."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="inductor-bench-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for kind in ("cold", "warm"):
            cmd = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--optimizers", name,
                   "--fused", "true", "--steps", "1", "--warmup", "1"]  # fmt: skip
            cmd += ["--threads", str(args.threads)] if args.threads else []
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
            first = [r for r in lines if r.get("optimizer") == f"{name}+fused"]
            out[f"{kind}_s"] = first[0]["first_step_s"] if first else f"failed: {proc.stderr[-300:]}"
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", help="model group option (nano, gpt2, gpt2-medium)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--optimizers", default="", help="comma-separated names (default: all)")
    parser.add_argument("--fused", default="both", choices=["both", "true", "false", "auto"],
                        help="optimizers with a fused step: eager and compiled (both), or one optimizer.fused value")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--references", action="store_true", help="also time each reference package")
    parser.add_argument("--compile-times", action="store_true", help="cold and warm compile of each fused step")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.optimizers.split(",") if args.optimizers else [*sorted(load_all()), *VARIANTS]
    refs = references() if args.references else {}

    def config(name: str, extra: list[str] = ()):
        return compose_config([f"model={args.model}", f"optimizer={name}", *extra])

    base = config("adamw")
    torch.manual_seed(0)
    model = MiniGPT(model_config(base.model, 50257 if args.model.startswith("gpt2") else 256)).to(device)
    grads = [torch.randn_like(p) * 1e-3 for p in model.parameters()]
    start = [p.detach().clone() for p in model.parameters()]
    ctx = BuildContext(device, global_batch=8, tokens_per_step=8 * base.model.block_size)
    print(json.dumps({"baseline": "torch.optim.AdamW(fused=True)", "params": model.num_params(), "device": str(device),
                      "threads": torch.get_num_threads()}), flush=True)  # fmt: skip

    def reset() -> None:
        with torch.no_grad():
            for p, s, g in zip(model.parameters(), start, grads, strict=True):
                p.copy_(s)
                p.grad = g.clone()

    def run(label: str, cfg) -> dict:
        reset()
        opt = build_optimizer(model, cfg, ctx)
        adamw = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)
        first, ms, adamw_ms = side_by_side(lambda i, f=opt.step: f(), lambda i, f=adamw.step: f(), args.steps,
                                           args.warmup, device)  # fmt: skip
        extra = {}
        if hasattr(opt, "update_hessian"):  # amortised: + one refresh every hook_every(cfg) steps
            first_refresh, refresh_ms, _ = side_by_side(lambda i, f=opt.update_hessian: f(), lambda i: None,
                                                        args.steps, args.warmup, device)  # fmt: skip
            first += first_refresh
            ms += refresh_ms / hook_every(cfg)
            extra = {"hessian_ms": round(refresh_ms, 2), "hessian_every": hook_every(cfg)}
        del opt, adamw
        gc.collect()
        return {"optimizer": label, "ms_per_step": round(ms, 2), "adamw_ms": round(adamw_ms, 2),
                "vs_fused_adamw": round(ms / adamw_ms, 3), "first_step_s": round(first, 2), **extra}  # fmt: skip

    def weights_after(cfg) -> list[torch.Tensor]:
        """The weights after --warmup + --steps steps from the start, each on the same gradients (schedule-free
        AdamW's package step divides .grad in place, so they are set again before every step)."""
        reset()
        opt = build_optimizer(model, cfg, ctx)
        step = stepper(opt, cfg)
        for i in range(args.steps + args.warmup):
            with torch.no_grad():
                for p, g in zip(model.parameters(), grads, strict=True):
                    p.grad.copy_(g)
            step(i)
        del opt, step
        gc.collect()
        return [p.detach().clone() for p in model.parameters()]

    for name in names:
        opt_name, extra = VARIANTS.get(name, (name, []))
        cfg = config(opt_name, extra).optimizer
        choices = ["false", "true"] if args.fused == "both" else [args.fused]
        if not isinstance(cfg, fused.FusedConfig):
            choices = [None]
        for choice in choices:
            if choice is not None:
                cfg = config(opt_name, [*extra, f"optimizer.fused={choice}"]).optimizer
            label = name + ("+fused" if choice == "true" else "")
            try:
                result = run(label, cfg)
            except Exception as e:  # one optimizer failing (a compile on a new device, say) is a result too
                print(json.dumps({"optimizer": label, "error": f"{type(e).__name__}: {e}"[:500]}), flush=True)
                gc.collect()
                continue
            if choice == "true" and args.fused == "both":
                eager = config(opt_name, [*extra, "optimizer.fused=false"]).optimizer
                pairs = zip(weights_after(cfg), weights_after(eager), strict=True)
                result["max_abs_diff_vs_eager"] = max((a - b).abs().max().item() for a, b in pairs)
            if choice == "true" and args.compile_times:
                result.update(compile_times(name, args))
            if name in refs and choice != "true":
                reset()
                ref_step = refs[name](param_groups(model, cfg.weight_decay), cfg).step
                _, ref_ms, _ = side_by_side(lambda i, f=ref_step: f(), lambda i: None, args.steps, args.warmup, device)
                result.update({"ref_ms": round(ref_ms, 2), "vs_ref": round(result["ms_per_step"] / ref_ms, 3)})
                del ref_step
                gc.collect()
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
