"""PNGs from a run's metrics.jsonl, for people who do not use W&B.

python scripts/plot_run.py runs/my-run               # -> runs/my-run/plots/*.png
python scripts/plot_run.py runs/my-run --out /tmp/p

Writes loss_lr.png (train/val loss, lr), grad_norm.png (pre-clip norm, clip events, skipped steps),
update_ratio_heatmap.png (log10 update/param ratio per layer) and optimizer_state.png (every opt/ key).
A figure whose keys the run did not log is skipped with a one-line note.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker as ticker
import numpy as np

from trainer.errors import exit_with_error

DPI = 100
WIDE = (9, 4.5)  # loss_lr.png and grad_norm.png: 900 x 450 px
HEATMAP = (10, 6)  # 1000 x 600 px
PANEL = (3.5, 2.5)  # optimizer_state.png: per panel; 3 a row (4 without min/median/max families)
SPREAD = ("min", "median", "max")
RATIO_REF = -3.0  # the usual rule of thumb for log10(update / param) with Adam-like optimizers
RATIO = "update/ratio_log10/"


def load(path: Path) -> list[dict]:
    """Records sorted by step; the last record of a step wins (a resume re-logs the steps it re-does)."""
    by_step, bad = {}, 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            by_step[int(record["step"])] = record
        except (ValueError, KeyError, TypeError):
            bad += line.strip() != ""
    if bad:
        print(f"note: ignored {bad} unreadable line(s) in {path}")
    return [by_step[s] for s in sorted(by_step)]


def series(records: list[dict], key: str, gaps: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that have `key` as a finite number (gaps: non-finite ones as NaN)."""
    pairs = [(r["step"], r[key] if math.isfinite(r[key]) else math.nan) for r in records
             if isinstance(r.get(key), (int, float)) and (gaps or math.isfinite(r[key]))]  # fmt: skip
    return np.array([p[0] for p in pairs], dtype=float), np.array([p[1] for p in pairs], dtype=float)


def layer_order(name: str) -> tuple:
    """embedding, block_00.attn, block_00.mlp, block_00.norm, block_01.attn, ..., final.norm, head."""
    m = re.fullmatch(r"block_(\d+)\.(\w+)", name)
    if m:
        kinds = ("attn", "mlp", "norm")
        return 1, int(m.group(1)), kinds.index(m.group(2)) if m.group(2) in kinds else 3, name
    return {"embedding": 0, "final.norm": 2, "head": 3}.get(name, 4), 0, 0, name


def plot_loss_lr(records: list[dict], run_dir: Path):
    train, val, lr = series(records, "train/loss"), series(records, "val/loss"), series(records, "lr")
    if not len(train[0]) and not len(val[0]):
        return None
    fig, ax = plt.subplots(figsize=WIDE)
    ax.plot(*train, label="train loss", color="C0", linewidth=1.4)
    ax.plot(*val, "o-", label="val loss", color="C3", markersize=4)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss and learning rate")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    if len(lr[0]):
        ax2 = ax.twinx()
        ax2.plot(*lr, "--", label="lr", color="C2", linewidth=1.2)
        ax2.set_ylabel("lr")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        handles = [a + b for a, b in zip(handles, ax2.get_legend_handles_labels(), strict=True)]
    ax.legend(*handles, loc="upper right")
    return fig


def grad_clip(run_dir: Path, records: list[dict]) -> float | None:
    """trainer.grad_clip from the run's config.yaml, else recovered from a logged clip_coef below 1."""
    try:
        import yaml

        clip = yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["grad_clip"]
        return float(clip) if clip and clip > 0 else None
    except Exception:
        coefs = [r["grad/clip_coef"] * (r["grad_norm"] + 1e-6) for r in records
                 if 0 < r.get("grad/clip_coef", 1) < 1 and isinstance(r.get("grad_norm"), (int, float))]  # fmt: skip
        return coefs[-1] if coefs else None


class PlainLog(ticker.LogFormatter):
    """Log-axis labels as plain numbers (0.6, 2, 300), on the ticks LogFormatter would label."""

    def __call__(self, x, pos=None):
        return f"{x:g}" if super().__call__(x, pos) else ""


def plot_grad_norm(records: list[dict], run_dir: Path):
    steps, norm = series(records, "grad_norm", gaps=True)  # a non-finite norm breaks the line
    if not np.isfinite(norm).any():
        return None
    clip = grad_clip(run_dir, records)
    fig, ax = plt.subplots(figsize=WIDE)
    ax.plot(steps, np.where(norm > 0, norm, np.nan), color="C0", linewidth=1.2, label="grad_norm (pre-clip)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(PlainLog(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(PlainLog(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    clipped = {r["step"]: r.get("grad/clipped_steps", 0) for r in records}
    events = [(s, n) for s, n in zip(steps, norm, strict=True) if clipped.get(int(s), 0) > 0 or (clip and n > clip)]
    title = "gradient norm"
    if clip:
        ax.axhline(clip, color="C1", linestyle="--", linewidth=1, label=f"grad_clip = {clip:g}")
        total = sum(n for n in clipped.values() if isinstance(n, (int, float)))
        title += f": {int(total)} of {int(steps[-1])} steps clipped" if total else ""
    if events:
        ax.plot(*zip(*events, strict=True), "o", color="C1", markersize=4, label="steps clipped since the previous log")
    skipped = [r["step"] for r in records if r.get("anomaly/skipped_steps", 0) > 0]
    for i, s in enumerate(skipped):
        ax.axvline(s, color="C3", alpha=0.6, linewidth=1.5, label="steps skipped (anomaly guard)" if i == 0 else None)
    ax.set(xlabel="step", ylabel="global L2 norm", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper right")
    return fig


def ratio_layers(records: list[dict]) -> list[str]:
    """The layers with an update ratio, in model order (not the per-kind summaries attn, mlp, norm, by_layer)."""
    names = {k[len(RATIO) :] for r in records for k in r if k.startswith(RATIO)}
    return sorted((n for n in names if "." in n or n in ("embedding", "head", "other")), key=layer_order)


def plot_ratio_heatmap(records: list[dict], run_dir: Path):
    layers = ratio_layers(records)
    rows = [r for r in records if any(RATIO + n in r for n in layers)]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=HEATMAP)
    grid = np.array([[r.get(RATIO + n, np.nan) for r in rows] for n in layers], dtype=float)
    grid[~np.isfinite(grid)] = np.nan  # -inf: the layer did not move (e.g. weight decay only, or frozen)
    steps = np.array([r["step"] for r in rows], dtype=float)
    gaps = np.diff(steps) if len(steps) > 1 else np.ones(1)  # cells span halfway to the neighbouring steps
    edges = np.concatenate([[steps[0] - gaps[0] / 2], steps[:-1] + gaps / 2, [steps[-1] + gaps[-1] / 2]])
    spread = max(0.5, np.nanmax(np.abs(grid - RATIO_REF))) if np.isfinite(grid).any() else 1.0
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="lightgrey")  # grey: no finite ratio
    mesh = ax.pcolormesh(edges, np.arange(len(layers) + 1) - 0.5, np.ma.masked_invalid(grid), cmap=cmap,
                         vmin=RATIO_REF - spread, vmax=RATIO_REF + spread)  # fmt: skip
    every = max(1, math.ceil(len(layers) / 40))
    ax.set_yticks(range(0, len(layers), every), layers[::every], fontsize=7)
    ax.set_ylim(len(layers) - 0.5, -0.5)  # model order from the top
    ax.set(xlabel="step", title="log10(|update| / |param|) per layer")
    bar = fig.colorbar(mesh, ax=ax)
    bar.ax.axhline(RATIO_REF, color="black", linewidth=1.5)
    bar.set_label(f"log10 ratio; {RATIO_REF:g} (white): rule of thumb for Adam-like optimizers\n"
                  "red: layer moves faster, blue: slower", fontsize=8)  # fmt: skip
    return fig


def panel_rows(keys: set[str]) -> list[list[str | None]]:
    """The other statistics packed into rows, then one row per min/median/max family (columns aligned)."""
    families, singles = {}, []
    for key in sorted(keys):
        base, _, last = key.rpartition("/")
        if last in SPREAD:
            families.setdefault(base, {})[last] = key
        else:
            singles.append(key)
    cols = 3 if families else min(4, len(singles))
    rows = [singles[i : i + cols] for i in range(0, len(singles), cols)]
    return rows + [[family.get(s) for s in SPREAD] for _, family in sorted(families.items())]


def plot_optimizer_state(records: list[dict], run_dir: Path):
    keys = {k for r in records for k in r if k.startswith("opt/") and isinstance(r[k], (int, float))}
    if not keys:
        return None
    rows = panel_rows(keys)
    cols = max(len(row) for row in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(PANEL[0] * cols, PANEL[1] * len(rows)), squeeze=False)
    for ax, key in zip(axes.flat, [k for row in rows for k in row + [None] * (cols - len(row))], strict=True):
        if key is None:
            ax.axis("off")
            continue  # an empty cell: a short row, or a family without min, median or max
        steps, values = series(records, key)
        ax.plot(steps, values, ".-", linewidth=1, markersize=3)
        if len(values) and values.min() > 0 and values.max() / values.min() > 100:
            ax.set_yscale("log")  # spreads and second moments span decades
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.supxlabel("step", fontsize=9)
    return fig


PLOTS = {  # file: (plotter, what it needs when it has nothing to draw)
    "loss_lr.png": (plot_loss_lr, "train/loss or val/loss"),
    "grad_norm.png": (plot_grad_norm, "finite grad_norm"),
    "update_ratio_heatmap.png": (plot_ratio_heatmap, f"{RATIO}<layer> keys (trainer.stats_interval > 0)"),
    "optimizer_state.png": (plot_optimizer_state, "opt/ keys (trainer.stats_interval > 0)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory (holding metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="where to write the PNGs (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    path = args.run_dir / "metrics.jsonl"
    records = load(path) if path.is_file() else None
    if not records:
        exit_with_error(f"{path} {'has no records' if records == [] else 'not found'}")
    out = args.out or args.run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    for name, (plot, needs) in PLOTS.items():
        fig = plot(records, args.run_dir)
        if fig is None:
            print(f"skip {name}: no {needs} in {path}")
            continue
        fig.tight_layout()
        fig.savefig(out / name, dpi=DPI)
        plt.close(fig)
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
