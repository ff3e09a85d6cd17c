"""Consolidate a checkpoint's weights into one safetensors file.

    python scripts/export.py runs/.../checkpoints/step_00001000       # writes <checkpoint>/model.safetensors
    python scripts/export.py runs/2026-11-26/08-00-00 --out gpt.safetensors   # a run's latest checkpoint

FSDP checkpoints hold one shard file per rank (torch.distributed.checkpoint); this reads all shards in
one process, whatever the world size they were saved with, and writes the whole model. Tied tensors
(the embedding and the output head) are stored once. The file loads with
`safetensors.torch.load_model(MiniGPT(config), path)`. scripts/sample.py reads either kind of checkpoint.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from safetensors.torch import save_model

from trainer import checkpoint as ckpt_io
from trainer.errors import ConfigError, exit_with_error


def export(ckpt: Path, out: Path) -> int:
    """Write the checkpoint's whole model to `out` (atomically); return its number of parameters."""
    model = ckpt_io.load_model(ckpt)
    tmp = out.with_name(f".{out.name}.tmp")
    save_model(model, str(tmp))
    os.replace(tmp, out)
    return model.num_params()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    parser.add_argument("--out", type=Path, help="output file (default: model.safetensors in the checkpoint)")
    args = parser.parse_args(argv)
    try:
        ckpt = ckpt_io.find_checkpoint(args.checkpoint, what="checkpoint")
        out = args.out or ckpt / "model.safetensors"
        if out.exists() and out.resolve() == (ckpt / "model.safetensors").resolve():
            print(f"{out} already holds the whole model")
            return
        n = export(ckpt, out)
    except (ConfigError, OSError, ValueError) as e:
        exit_with_error(str(e))
    kind = "sharded" if ckpt_io.is_sharded(ckpt) else "whole"
    print(f"wrote {out} ({n / 1e6:.2f}M parameters, from the {kind} checkpoint {ckpt})")


if __name__ == "__main__":
    main()
