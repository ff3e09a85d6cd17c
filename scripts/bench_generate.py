"""Generation speed with and without the key/value cache, side by side (random weights, greedy, fp32).

    python scripts/bench_generate.py                              # model=nano and model=gpt2, 256 new tokens
    python scripts/bench_generate.py --models llama-nano --new-tokens 512 --device cuda

One JSON line per (model, mode), then the speed-up of each model. "uncached" is generation as it was
before the cache: every step reads the last block_size tokens again and runs the head over all of them.
"cached" reads one token per step and runs the head over the last position only. The two read the same
context while it fits in block_size (`same_tokens_in_window` compares them there); past it the cache
keeps the newest half of the window (models/minigpt.py: MiniGPT.generate).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from models.minigpt import MiniGPT
from trainer.build import model_config
from trainer.config import DeviceKind
from trainer.entry.cli import compose_config
from trainer.runtime import device_sync, pick_device

VOCAB = {"gpt2": 50257, "gpt2-medium": 50257, "llama-124m": 50257}  # the GPT-2 tokenizer; others: bytes


def timed(model: MiniGPT, prompt: torch.Tensor, n: int, use_cache: bool) -> tuple[torch.Tensor, float]:
    device_sync(prompt.device)
    start = time.perf_counter()
    out = model.generate(prompt, n, temperature=0, use_cache=use_cache)
    device_sync(prompt.device)
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="nano,gpt2", help="comma-separated configs/model options")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--device", default="cpu", choices=[d.value for d in DeviceKind])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(DeviceKind(args.device))
    for name in args.models.split(","):
        cfg = compose_config([f"model={name}"])
        torch.manual_seed(0)
        model = MiniGPT(model_config(cfg.model, VOCAB.get(name, 256))).to(device).eval()
        prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
        model.generate(prompt, 2)  # warm-up
        seconds, outs = {}, {}
        for mode in ("uncached", "cached"):
            outs[mode], seconds[mode] = timed(model, prompt, args.new_tokens, use_cache=mode == "cached")
            print(json.dumps({"model": name, "mode": mode, "new_tokens": args.new_tokens, "device": str(device),
                              "threads": torch.get_num_threads(), "seconds": round(seconds[mode], 3),
                              "tokens_per_s": round(args.new_tokens / seconds[mode], 1)}), flush=True)  # fmt: skip
        window = model.config.block_size
        same = torch.equal(outs["cached"][:, :window], outs["uncached"][:, :window])
        print(json.dumps({"model": name, "speedup": round(seconds["uncached"] / seconds["cached"], 2),
                          "same_tokens_in_window": same, "block_size": window}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
