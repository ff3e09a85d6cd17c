"""Generate text from a checkpoint.

    python scripts/sample.py runs/2026-11-26/08-00-00 --prompt "def " --max-new-tokens 300
    python scripts/sample.py runs/.../checkpoints/step_00001000 --temperature 0 # greedy

The argument is a checkpoint directory, or a run directory (its latest checkpoint is used).
"""

from __future__ import annotations

import argparse

from trainer import checkpoint as ckpt_io
from trainer.config import DeviceKind
from trainer.data.tokenizers import load_tokenizer
from trainer.errors import ConfigError, exit_with_error
from trainer.loop import generate_text
from trainer.runtime import pick_device


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint directory or run directory")
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--max-new-tokens", type=int, default=300)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=40, help="0 = no top-k filtering")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=[d.value for d in DeviceKind])
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0:
        parser.error("--max-new-tokens, --temperature and --top-k must be >= 0")
    try:
        ckpt = ckpt_io.find_checkpoint(args.checkpoint, what="checkpoint")
        device = pick_device(DeviceKind(args.device))
        model = ckpt_io.load_model(ckpt)
        tokenizer = load_tokenizer(ckpt / "tokenizer")
        text = generate_text(model.to(device), tokenizer, args.prompt, args.max_new_tokens,
                             args.temperature, args.top_k, args.seed)  # fmt: skip
    except (ConfigError, ValueError) as e:
        exit_with_error(str(e))
    print(text)


if __name__ == "__main__":
    main()
