"""The loss along 1 or 2 random filter-normalised directions around a checkpoint.

    python scripts/loss_landscape.py runs/2026-11-26/08-00-00                  # -> <checkpoint>/landscape_1d.png
    python scripts/loss_landscape.py runs/.../checkpoints/step_00001000 --dims 2 --points 21 --span 1.0

Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets": each direction is Gaussian, and every
row (filter) of each weight matrix is rescaled to the norm of the same row of the weights; 1-D
parameters (biases, norms) get a zero direction. The loss is the mean over --batches fixed validation
batches, rebuilt from the checkpoint's config.yaml (the run's corpus, tokenizer, val split and batch
size). dims=1 plots loss(alpha), dims=2 a contour of loss(alpha, beta) with the centre marked; the
numbers go to a JSON file next to the PNG.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from trainer import checkpoint as ckpt_io
from trainer.build import prepare_data
from trainer.config import DataConfig, DeviceKind, TokenizerConfig
from trainer.data.corpus import check_split_sizes
from trainer.data.sampling import validation_windows
from trainer.errors import ConfigError, exit_with_error
from trainer.runtime import pick_device


def val_batches(ckpt: Path, n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first n validation batches the run's own evaluations read (same corpus, split and batch size)."""
    raw = OmegaConf.load(ckpt / "config.yaml")
    group = lambda schema, key: OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), raw[key]))
    cfg = SimpleNamespace(data=group(DataConfig, "data"), tokenizer=group(TokenizerConfig, "tokenizer"))
    _, splits = prepare_data(cfg, progress=False)
    seq_len = cfg.data.seq_len or raw.model.block_size
    batch_size = raw.trainer.micro_batch_size
    check_split_sizes(splits, seq_len, 1)
    windows = validation_windows(splits.val, seq_len, batch_size, device)
    return [windows.next_batch() for _ in range(n)]


def random_direction(model: torch.nn.Module, generator: torch.Generator) -> list[torch.Tensor]:
    """A Gaussian direction, filter-normalised: each row of a matrix has its weight row's norm; 1-D: zero."""
    direction = []
    for p in model.parameters():  # tied weights (embedding = head) once
        w = p.detach()
        if w.dim() <= 1:
            direction.append(torch.zeros_like(w))
            continue
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device)
        rows, wrows = d.reshape(len(d), -1), w.reshape(len(w), -1)
        rows.mul_(wrows.norm(dim=1, keepdim=True) / (rows.norm(dim=1, keepdim=True) + 1e-10))
        direction.append(d)  # rows is a view of d
    return direction


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: list) -> float:
    return torch.stack([model(x, y)[1] for x, y in batches]).mean().item()


@torch.no_grad()
def loss_grid(model: torch.nn.Module, batches: list, directions: list, alphas: np.ndarray, progress=True):
    """Losses at w0 + a*d1 (1-D, shape (n,)) or w0 + a*d1 + b*d2 (2-D, shape (n, n), [i, j] = (alphas[i],
    alphas[j])). The model's weights are restored afterwards."""
    params = list(model.parameters())
    origin = [p.detach().clone() for p in params]
    grid = [(a,) for a in alphas] if len(directions) == 1 else [(a, b) for a in alphas for b in alphas]
    losses = []
    model.eval()
    try:
        for coords in tqdm(grid, desc="landscape", disable=not progress):
            for i, p in enumerate(params):
                p.copy_(origin[i])
                for c, d in zip(coords, directions, strict=True):
                    p.add_(d[i], alpha=float(c))
            losses.append(mean_loss(model, batches))
    finally:
        for p, w in zip(params, origin, strict=True):
            p.copy_(w)
    return np.array(losses).reshape((len(alphas),) * len(directions))


def plot(out: Path, alphas: np.ndarray, losses: np.ndarray, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.5) if losses.ndim == 1 else (6, 5), dpi=100)
    if losses.ndim == 1:
        ax.plot(alphas, losses, marker="o", markersize=3)
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="alpha", ylabel="val loss")
    else:
        b, a = np.meshgrid(alphas, alphas)  # losses[i, j] is at (alphas[i], alphas[j])
        levels = np.linspace(losses.min(), losses.max(), 20) if np.ptp(losses) > 0 else None
        cs = ax.contour(a, b, losses, levels=levels, cmap="viridis")
        ax.clabel(cs, fontsize=7, fmt="%.2f")
        ax.plot(0, 0, marker="*", color="red", markersize=12, label="checkpoint")
        ax.set(xlabel="alpha (direction 1)", ylabel="beta (direction 2)", aspect="equal")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    parser.add_argument("--dims", type=int, default=1, help="1 (a line) or 2 (a contour plot)")
    parser.add_argument("--points", type=int, default=21, help="grid points per direction (>= 3)")
    parser.add_argument("--span", type=float, default=1.0, help="alpha runs over [-span, span]")
    parser.add_argument("--batches", type=int, default=4, help="validation batches per loss")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    parser.add_argument("--device", default="auto", choices=[d.value for d in DeviceKind])
    parser.add_argument("--out", type=Path, help="output PNG (default <checkpoint>/landscape_<dims>d.png)")
    args = parser.parse_args(argv)
    try:
        if args.dims not in (1, 2):
            raise ValueError(f"--dims={args.dims}: give 1 or 2")
        if args.points < 3 or args.batches < 1 or not args.span > 0:
            raise ValueError("--points must be >= 3, --batches >= 1 and --span > 0")
        ckpt = ckpt_io.find_checkpoint(args.checkpoint, what="checkpoint")
        device = pick_device(DeviceKind(args.device))
        model = ckpt_io.load_model(ckpt).to(device)
        batches = val_batches(ckpt, args.batches, device)
        generator = torch.Generator().manual_seed(args.seed)
        directions = [random_direction(model, generator) for _ in range(args.dims)]
        alphas = np.linspace(-args.span, args.span, args.points)
        center = mean_loss(model, batches)
        losses = loss_grid(model, batches, directions, alphas)
        out = args.out or ckpt / f"landscape_{args.dims}d.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        title = f"{ckpt.parent.parent.name}/{ckpt.name}: loss at centre {center:.4f}, {args.batches} val batches"
        plot(out, alphas, losses, title)
        numbers = {"checkpoint": str(ckpt), "dims": args.dims, "span": args.span, "points": args.points,
                   "batches": args.batches, "seed": args.seed, "center_loss": center,
                   "alphas": alphas.tolist(), "losses": losses.tolist()}  # fmt: skip
        out.with_suffix(".json").write_text(json.dumps(numbers, indent=1) + "\n")
    except (ConfigError, OSError, ValueError) as e:
        exit_with_error(str(e))
    print(f"wrote {out} and {out.with_suffix('.json')} (loss at centre {center:.4f}, "
          f"{losses.min():.4f} .. {losses.max():.4f} over the grid)")  # fmt: skip


if __name__ == "__main__":
    main()
