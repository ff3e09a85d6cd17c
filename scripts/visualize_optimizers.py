"""Draw the path of every optimizer of the zoo on 2-D test surfaces, one PNG per surface.

python scripts/visualize_optimizers.py                      # runs/optimizer_paths/{rosenbrock,ravine}.png, 300 steps
python scripts/visualize_optimizers.py --steps 50 --out /tmp/paths --optimizers sgd,adamw,lion

The point (x, y) is an nn.Module holding one parameter, and each optimizer is built exactly as the trainer
builds it: `optimizer=<name>` composed by Hydra, then `build_optimizer(model, cfg.optimizer, BuildContext)`.
- The point is a 1-D parameter of 2 elements, so `param_groups` puts it in the no-decay group: weight decay
  never moves the surface's minimum. adamw8bit keeps fp32 state below `min_8bit_size`, so it follows AdamW.
- Muon orthogonalises 2-D parameters only; for it the point is a 1x2 matrix (Newton-Schulz then normalises
  the momentum direction: a normalised-momentum step) plus an unused 1-element parameter that gives the
  builder's AdamW part something to hold; it never gets a gradient, so it never moves. Muon's weight decay
  is set to 0 (it would pull the matrix towards the origin).
- Skipped: see SKIP (printed when run).
Learning rates come from LRS, one per optimizer family and surface, chosen so that each path is visible on
the plot, not tuned: do not read the plots as a ranking.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm import tqdm

from optim.builder import BuildContext, build_optimizer, load_all
from trainer.entry.cli import compose_config

REPO = Path(__file__).resolve().parent.parent

SKIP = {"sophia": "its Hessian refresh (build_hook) needs language-model batches to sample labels from the model's "
                  "logits; without it SophiaG is sign descent with momentum"}  # fmt: skip

_C, _S = math.cos(math.radians(30)), math.sin(math.radians(30))


def rosenbrock(p: torch.Tensor) -> torch.Tensor:
    x, y = p[..., 0], p[..., 1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def ravine(p: torch.Tensor) -> torch.Tensor:
    """0.5 (u^2 + 100 v^2) in axes rotated by 30 degrees: condition number 100."""
    x, y = p[..., 0], p[..., 1]
    u, v = _C * x + _S * y, -_S * x + _C * y
    return 0.5 * (u**2 + 100 * v**2)


@dataclass(frozen=True)
class Surface:
    name: str
    f: object  # tensor (..., 2) -> tensor (...)
    start: tuple[float, float]
    minimum: tuple[float, float]
    extent: tuple[float, float, float, float]  # xmin, xmax, ymin, ymax of the plot
    noise: float = 0.0  # std of the Gaussian noise added to each gradient coordinate (seeded)


SURFACES = {
    "rosenbrock": Surface("rosenbrock", rosenbrock, (-1.2, 1.0), (1.0, 1.0), (-2.0, 2.0, -1.0, 3.0)),
    "ravine": Surface("ravine", ravine, (-4.0, 0.5), (0.0, 0.0), (-5.0, 5.0, -3.5, 3.5), noise=2.0),
}
# lr per optimizer family and surface: chosen so that each path is visible, not tuned
FAMILY = {"sgd": "sgd", "momentum": "momentum", "nesterov": "momentum", "adagrad": "adagrad", "rmsprop": "adam",
          "adam": "adam", "adamw": "adam", "adamw8bit": "adam", "adabelief": "adam", "schedulefree_adamw": "adam",
          "lamb": "lamb", "adafactor": "adafactor", "lion": "sign", "muon": "sign"}  # fmt: skip
LRS = {
    "rosenbrock": {"sgd": 1e-3, "momentum": 2e-4, "adagrad": 0.3, "adam": 0.03, "lamb": 0.03, "adafactor": 0.03,
                   "sign": 0.01},
    "ravine": {"sgd": 0.015, "momentum": 1.5e-3, "adagrad": 0.5, "adam": 0.05, "lamb": 0.05, "adafactor": 0.05,
               "sign": 0.03},
}  # fmt: skip


class Point(torch.nn.Module):
    def __init__(self, start: tuple[float, float], matrix: bool = False):
        super().__init__()
        self.xy = torch.nn.Parameter(torch.tensor([start] if matrix else start, dtype=torch.float32))
        if matrix:  # Muon: see the module docstring
            self.unused = torch.nn.Parameter(torch.zeros(1))


def make_optimizer(name: str, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    overrides = [f"optimizer={name}", f"optimizer.lr={lr}"] + (["optimizer.weight_decay=0"] if name == "muon" else [])
    cfg = compose_config(overrides)
    return build_optimizer(model, cfg.optimizer, BuildContext(torch.device("cpu")))


def trajectory(name: str, surface: Surface | str, steps: int, lr: float | None = None, seed: int = 0) -> np.ndarray:
    """(steps + 1, 2) points visited by optimizer `name`, built as the trainer builds it."""
    s = SURFACES[surface] if isinstance(surface, str) else surface
    model = Point(s.start, matrix=name == "muon")
    opt = make_optimizer(name, model, lr if lr is not None else LRS[s.name][FAMILY.get(name, "adam")])
    gen = torch.Generator().manual_seed(seed)
    path = [model.xy.detach().reshape(2).clone()]
    for _ in range(steps):
        opt.zero_grad()
        s.f(model.xy.reshape(2)).backward()
        if s.noise:
            model.xy.grad.add_(s.noise * torch.randn(model.xy.shape, generator=gen))
        opt.step()
        path.append(model.xy.detach().reshape(2).clone())
    return torch.stack(path).double().numpy()


def plot(surface: Surface, paths: dict[str, np.ndarray], out: Path) -> None:
    x0, x1, y0, y1 = surface.extent
    gx, gy = np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300))
    z = surface.f(torch.from_numpy(np.stack([gx, gy], axis=-1))).numpy()
    fig, ax = plt.subplots(figsize=(9, 7))
    levels = np.logspace(np.log10(max(z.min(), 1e-3)), np.log10(z.max()), 25)
    ax.contour(gx, gy, z, levels=levels, cmap="Greys", linewidths=0.6, norm=matplotlib.colors.LogNorm())
    for i, (name, path) in enumerate(paths.items()):  # 10 colours, then the same colours dashed
        colour, style = plt.get_cmap("tab10")(i % 10), ("-", "--", ":")[i // 10 % 3]
        ax.plot(path[:, 0], path[:, 1], style, color=colour, linewidth=1.3, label=name)
        ax.plot(path[-1, 0], path[-1, 1], "o", color=colour, markersize=4)
    ax.plot(*surface.start, "ks", markersize=6, label="start")
    ax.plot(*surface.minimum, "r*", markersize=14, label="minimum")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    noise = f", gradient noise std {surface.noise}" if surface.noise else ""
    ax.set_title(f"{surface.name}: {len(next(iter(paths.values()))) - 1 if paths else 0} steps{noise}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="runs/optimizer_paths", help="output directory")
    parser.add_argument("--optimizers", default=None, help="comma-separated names (default: the whole zoo)")
    args = parser.parse_args(argv)
    zoo = sorted(load_all())
    names = args.optimizers.split(",") if args.optimizers else zoo
    unknown = [n for n in names if n not in zoo]
    if unknown:
        parser.error(f"unknown optimizer(s) {', '.join(unknown)}; choose from {', '.join(zoo)}")
    for name in names:
        if name in SKIP:
            print(f"skipped {name}: {SKIP[name]}")
    names = [n for n in names if n not in SKIP]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, dict[str, np.ndarray]] = {s: {} for s in SURFACES}
    for name in tqdm(names, desc="optimizers", file=sys.stderr):
        for s in SURFACES:
            paths[s][name] = trajectory(name, s, args.steps)
    for s, surface in SURFACES.items():
        plot(surface, paths[s], out / f"{s}.png")
        print(f"wrote {out / f'{s}.png'}")


if __name__ == "__main__":
    main()
