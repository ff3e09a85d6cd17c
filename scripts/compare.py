"""Compare optimizers or configurations over seeds: val loss, steps and seconds to a target, significance.

    python scripts/compare.py multirun/2026-01-01/10-00-00          # a Hydra sweep dir (subdirs 0/, 1/, ...)
    python scripts/compare.py runs/a runs/b runs/c --target 3.3 --baseline lion
    python scripts/compare.py sweep --baseline "optimizer=adamw" --alpha 0.01 --out /tmp/cmp

The benchmark set-up (modded-nanogpt style): fixed data, architecture and batch; the optimizer (or another
config key) varies; each configuration runs with several seeds; a configuration only beats the baseline when
seed noise cannot explain the difference.

Runs: a run directory holds config.yaml (the resolved config) and metrics.jsonl. Each argument is a run
directory or a directory searched recursively (sorted; hidden directories and checkpoints/ are skipped). A run
with config.yaml but a missing or empty metrics.jsonl is counted as failed. When metrics.jsonl repeats a step
(after a resume) the later record wins.

Configurations: runs whose flattened configs (dotted keys) are equal after ignoring trainer.seed and the
bookkeeping keys logger.*, trainer.resume, trainer.progress, trainer.ckpt_interval, trainer.keep_checkpoints,
trainer.sample_* and data.cache_dir form one configuration; its runs are its seeds. Its label lists the keys
whose values differ across configurations as key=value; a differing optimizer.name is written optimizer=NAME and
the other optimizer.* keys are left out unless they differ between configurations with the same name (likewise
schedule.*). A single configuration is labelled optimizer=NAME.

Per configuration (mean ± std over seeds, std with ddof=1, n/a for one seed; a missing metric gives n/a):
  final val loss     val/loss at the last eval (over the seeds where it is finite; "(k/n)" when not all)
  best val loss      min val/loss over the evals
  steps to target    per seed, the first eval with val/loss <= target, interpolated from the eval before it:
                     step = s0 + (l0 - target) / (l0 - l1) * (s1 - s0); the first eval's step when that eval
                     already is <= target. Mean ± std over the seeds that reached it; "reached" is k/n.
  train s to target  the same with time/train_s (training wall seconds, 0 at step 0) in place of the step
  tok/s              per seed the median tokens_per_s without the first log record (warm-up); mean over seeds
  opt state MiB      the last memory/optimizer_state_mb; mean over seeds
  skipped            sum over seeds of the last anomaly/skipped_total
  diverged           seeds whose last val/loss is not finite or above their first (step-0) val/loss, or whose
                     last logged step is below trainer.max_steps

Target: --target, else the max over the baseline seeds of each seed's best val loss (a loss every baseline seed
reached). Baseline: --baseline names a label or an optimizer.name (default adamw). When several configurations
match, or no --baseline was given and none is adamw, the one with the lowest mean final val loss is used.
Every other configuration gets Δ final (its mean final val loss minus the baseline's) and Δ steps (same for
steps to target, over the seeds that reached it), each with the p-value of Welch's t-test
(scipy.stats.ttest_ind(a, b, equal_var=False); n/a with fewer than 2 seeds a side) and that p-value
Holm-corrected (Holm 1979) across every configuration tested against the baseline: with 14 comparisons, a
raw p of 0.01 is not enough. The verdict, on final val loss: better / worse only when the Holm-adjusted
p < alpha, otherwise "no sig. diff."; n/a with fewer than 2 seeds a side. (trainer/lab/benchmark/stats.py
holds the test, the correction and the interpolation; scripts/benchmark.py uses them too.)

Writes OUT/compare.md (the table), OUT/compare.json (the numbers, per configuration and per seed),
OUT/val_loss_vs_steps.png and OUT/val_loss_vs_time.png (mean over seeds per eval, min-max band, the target
dashed). OUT is --out, else the argument when a single directory was given, else ./compare. Rows: the
baseline first, then by mean final val loss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import yaml
from tqdm import tqdm

from trainer.errors import exit_with_error
from trainer.lab.benchmark.stats import holm, steps_to_target, welch

IGNORED = {"trainer.seed", "trainer.resume", "trainer.progress", "trainer.ckpt_interval", "trainer.keep_checkpoints",
           "data.cache_dir"}  # fmt: skip
IGNORED_PREFIXES = ("logger.", "trainer.sample_")
FAMILIES = ("optimizer", "schedule")  # a differing NAME stands for the family's other keys
NA = "n/a"
COLUMNS = ["configuration", "seeds", "failed", "final val loss", "best val loss", "steps to target", "reached",
           "train s to target", "tok/s", "opt state MiB", "skipped", "diverged", "Δ final (p, Holm)",
           "Δ steps (p, Holm)", "verdict"]  # fmt: skip


class InputError(Exception):
    """Bad input: main prints it as one `error:` line and exits 2."""


class Run(NamedTuple):
    path: Path
    config: dict  # flattened: dotted keys
    records: list[dict]  # sorted by step; empty for a failed run
    seed: object = None


def num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


finite_or_none = lambda x: float(x) if x is not None and math.isfinite(num(x)) else None  # JSON has no NaN
fmt = lambda x, spec: NA if x is None else format(x, spec)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v}
    return out


def find_run_dirs(paths: list[Path]) -> list[Path]:
    found = []
    for p in paths:
        if not p.is_dir():
            raise InputError(f"{p} is not a directory")
        for root, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "checkpoints")
            if "config.yaml" in files:
                found.append(Path(root))
                dirs[:] = []  # a run directory's subdirectories are its own
    return list(dict.fromkeys(found))


def load_metrics(path: Path) -> list[dict]:
    """Records sorted by step; the last record of a step wins. Unreadable lines are ignored."""
    by_step = {}
    try:
        lines = path.read_text().splitlines()
    except (OSError, ValueError):  # missing or unreadable: a failed run
        lines = []
    for line in lines:
        try:
            record = json.loads(line)
            by_step[int(record["step"])] = record | {"step": int(record["step"])}
        except (ValueError, KeyError, TypeError):
            pass
    return [by_step[s] for s in sorted(by_step)]


def load_runs(paths: list[Path]) -> list[Run]:
    dirs = find_run_dirs(paths)
    runs = []
    for d in tqdm(dirs, desc="reading runs", unit="run", disable=len(dirs) < 20, file=sys.stderr):
        try:
            cfg = yaml.safe_load((d / "config.yaml").read_text())
        except (OSError, ValueError, yaml.YAMLError):
            cfg = None
        if not isinstance(cfg, dict):
            print(f"note: skipped {d}: config.yaml is not a readable YAML mapping", file=sys.stderr)
            continue
        flat = flatten(cfg)
        runs.append(Run(d, flat, load_metrics(d / "metrics.jsonl"), flat.get("trainer.seed")))
    return runs


def canonical(config: dict) -> dict:
    """The config without seed and bookkeeping keys, values as JSON strings (comparable, hashable)."""
    skip = lambda k: k in IGNORED or k.startswith(IGNORED_PREFIXES)
    return {k: json.dumps(v, sort_keys=True, default=str) for k, v in config.items() if not skip(k)}


def group_runs(runs: list[Run]) -> list[list[Run]]:
    """Runs with equal configs (seed and bookkeeping aside), in order of first appearance; seeds sorted."""
    groups = defaultdict(list)
    for run in runs:
        groups[json.dumps(canonical(run.config), sort_keys=True)].append(run)
    order = lambda r: (not isinstance(r.seed, int), r.seed if isinstance(r.seed, int) else 0, str(r.path))
    return [sorted(g, key=order) for g in groups.values()]


def fmt_value(v) -> str:
    """A config value in a label: strings as they are, the rest as compact JSON (0.0003, [0.9,0.95], null)."""
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), default=str)


def label_groups(configs: list[dict]) -> list[str]:
    """key=value for the keys that differ across configurations (see the module docstring)."""
    if len(configs) == 1:
        name = configs[0].get("optimizer.name")
        return [f"optimizer={name}" if name is not None else "config"]
    canon = [canonical(c) for c in configs]
    differing = [k for k in sorted(set().union(*canon)) if len({c.get(k) for c in canon}) > 1]
    keep = []
    for k in differing:
        fam, _, rest = k.partition(".")
        if fam in FAMILIES and rest != "name" and f"{fam}.name" in differing:
            by_name = defaultdict(set)
            for c in canon:
                by_name[c.get(f"{fam}.name")].add(c.get(k))
            if all(len(values) == 1 for values in by_name.values()):
                continue
        keep.append(k)
    rank = lambda k: FAMILIES.index(k.split(".")[0]) if k.split(".")[0] in FAMILIES else len(FAMILIES)
    keep.sort(key=lambda k: (rank(k), k.partition(".")[2] != "name", k))
    labels = []
    for c in configs:
        parts = []
        for k in keep:
            fam, _, rest = k.partition(".")
            shown = fam if fam in FAMILIES and rest == "name" else k
            parts.append(f"{shown}={fmt_value(c[k]) if k in c else 'unset'}")
        labels.append(" ".join(parts))
    dup = {label for label, n in Counter(labels).items() if n > 1}  # values that print alike (e.g. 1 and "1")
    return [f"{x} #{labels[:i].count(x) + 1}" if x in dup else x for i, x in enumerate(labels)]


def evals(records: list[dict]) -> list[tuple[int, float, float]]:
    """(step, val loss, train seconds) per eval; train seconds are 0 at step 0 and nan where not logged."""
    return [(r["step"], num(r["val/loss"]), 0.0 if r["step"] == 0 else num(r.get("time/train_s")))
            for r in records if "val/loss" in r]  # fmt: skip


def seed_stats(run: Run, target: float) -> dict:
    ev = evals(run.records)
    losses = [loss for _, loss, _ in ev]
    reached = steps_to_target(ev, target)
    tps = [num(r["tokens_per_s"]) for r in run.records if "tokens_per_s" in r]
    tps = tps[1:] if len(tps) > 1 else tps
    last = lambda key: next((num(r[key]) for r in reversed(run.records) if key in r), math.nan)
    max_steps = run.config.get("trainer.max_steps")
    stopped = isinstance(max_steps, int) and run.records[-1]["step"] < max_steps
    bad_end = bool(ev) and (not math.isfinite(losses[-1]) or losses[-1] > losses[0])
    skipped = finite_or_none(last("anomaly/skipped_total"))
    return {"seed": run.seed, "path": str(run.path), "last_step": run.records[-1]["step"],
            "final_val_loss": finite_or_none(losses[-1]) if ev else None,
            "best_val_loss": finite_or_none(min((x for x in losses if math.isfinite(x)), default=None)),
            "steps_to_target": finite_or_none(reached[0]) if reached else None,
            "time_to_target": finite_or_none(reached[1]) if reached else None,
            "tokens_per_s": finite_or_none(statistics.median(tps)) if tps else None,
            "optimizer_state_mb": finite_or_none(last("memory/optimizer_state_mb")),
            "skipped": int(skipped) if skipped is not None else None, "diverged": bad_end or stopped}  # fmt: skip


def mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs) if xs else None, "std": statistics.stdev(xs) if len(xs) > 1 else None,
            "n": len(xs)}  # fmt: skip


def summarise(runs: list[Run], target: float) -> dict:
    seeds = [seed_stats(r, target) for r in runs if r.records]
    col = lambda key: [s[key] for s in seeds if s[key] is not None]
    failed = [str(r.path) for r in runs if not r.records]
    return {"n": len(seeds), "failed": len(failed), "failed_paths": failed,
            **{k: mean_std(col(k)) for k in ("final_val_loss", "best_val_loss", "steps_to_target", "time_to_target")},
            "reached": len(col("steps_to_target")),
            "tokens_per_s": mean_std(col("tokens_per_s"))["mean"],
            "optimizer_state_mb": mean_std(col("optimizer_state_mb"))["mean"],
            "skipped_steps": sum(col("skipped")) if col("skipped") else None,
            "diverged": sum(s["diverged"] for s in seeds), "seeds": seeds}  # fmt: skip


def verdict(cmp: dict | None, alpha: float, diverged: int = 0) -> str:
    """better / worse only when the Holm-adjusted p (the raw p when there is none) < alpha; a configuration
    that diverged on some seed is never `better` (its finished seeds alone would flatter it)."""
    if cmp is None or min(cmp["n"]) < 2 or cmp["p"] is None:
        return NA
    if cmp.get("p_holm", cmp["p"]) < alpha:
        return "worse" if cmp["diff"] > 0 else f"unstable ({diverged} diverged)" if diverged else "better"
    return "no sig. diff."


def choose_baseline(labels: list[str], configs: list[dict], summaries: list[dict], wanted: str | None):
    name, note = wanted or "adamw", ""
    match = [i for i, label in enumerate(labels) if label == name]
    match = match or [i for i, c in enumerate(configs) if str(c.get("optimizer.name")) == name]
    done = [i for i in match if summaries[i]["final_val_loss"]["n"]]
    if match and not done:
        raise InputError(f"--baseline {name} matches only configurations without a finished run: {labels[match[0]]}")
    if not match:
        if wanted:
            raise InputError(f"--baseline {wanted} matches no configuration; configurations: {', '.join(labels)}")
        done = [i for i, s in enumerate(summaries) if s["final_val_loss"]["n"]]
        if not done:
            raise InputError("no run has a finite final val loss")
        note = "no adamw configuration: the baseline is the one with the lowest mean final val loss"
    elif len(done) > 1:
        note = f"{len(done)} configurations match {name}: the baseline is the one with the lowest mean final val loss"
    return min(done, key=lambda i: (summaries[i]["final_val_loss"]["mean"], labels[i])), note


def table_row(r: dict) -> list[str]:
    """One configuration's cells, in COLUMNS order."""
    ms = lambda key, spec: f"{fmt(r[key]['mean'], spec)} ± {fmt(r[key]['std'], spec)}"
    some = f" ({r['final_val_loss']['n']}/{r['n']})" if r["final_val_loss"]["n"] < r["n"] else ""
    cmp = r["vs_baseline"] or {}
    delta = lambda key, spec: ("baseline" if r["baseline"] else NA if cmp.get(key) is None
                               else f"{cmp[key]['diff']:{spec}} (p={fmt(cmp[key]['p'], '.3g')}, "
                                    f"Holm {fmt(cmp[key].get('p_holm'), '.3g')})")  # fmt: skip
    return [r["label"], str(r["n"]), str(r["failed"]), ms("final_val_loss", ".4f") + some, ms("best_val_loss", ".4f"),
            ms("steps_to_target", ".0f"), f"{r['reached']}/{r['n']}", ms("time_to_target", ".1f"),
            fmt(r["tokens_per_s"], ".0f"), fmt(r["optimizer_state_mb"], ".1f"), fmt(r["skipped_steps"], "d"),
            f"{r['diverged']}/{r['n']}", delta("final_val_loss", "+.4f"), delta("steps_to_target", "+.0f"),
            r["verdict"]]  # fmt: skip


def render_table(rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(COLUMNS, *rows, strict=True)]
    pad = lambda i, c, w: c.ljust(w) if i == 0 else c.rjust(w)
    line = lambda cells: "  ".join(pad(i, c, w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *map(line, rows)])


def render_markdown(rows: list[list[str]], header: str) -> str:
    cell = lambda c: c.replace("|", "\\|")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join([":---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return (
        f"# Run comparison\n\n{header}\n\n" + "\n".join(lines) + "\n\nVerdict: Welch's t-test on final val loss "
        "against the baseline, its p-values Holm-corrected across the configurations compared. "
        "![val loss vs steps](val_loss_vs_steps.png) ![val loss vs time](val_loss_vs_time.png)\n"
    )


def curve(runs: list[Run]) -> tuple[np.ndarray, ...]:
    """Eval steps, mean / min / max val loss over seeds, and mean train seconds (nan where none) per step."""
    losses, times = defaultdict(list), defaultdict(list)
    for run in runs:
        for s, loss, t in evals(run.records):
            if math.isfinite(loss):
                losses[s].append(loss)
            if math.isfinite(t):
                times[s].append(t)
    steps = sorted(losses)
    mean_t = [statistics.fmean(times[s]) if times[s] else math.nan for s in steps]
    agg = lambda f: np.array([f(losses[s]) for s in steps], dtype=float)
    return np.array(steps, dtype=float), agg(statistics.fmean), agg(min), agg(max), np.array(mean_t, dtype=float)


def plot(groups: list[list[Run]], labels: list[str], target: float, out: Path) -> list[Path]:
    """Per x axis (steps, train seconds): every curve on the left, and its second half zoomed on the right,
    where the configurations separate."""
    cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    curves = [curve(g) for g in groups]
    starts = [c[1][0] for c in curves if len(c[0])]
    paths = []
    for mode, xlabel in (("steps", "step"), ("time", "train seconds (mean over seeds)")):
        xs = [c[0] if mode == "steps" else c[4] for c in curves]
        x_end = max((np.nanmax(x) for x in xs if np.isfinite(x).any()), default=0.0)
        fig, axes = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
        for ax, x_from in zip(axes, (-np.inf, x_end / 2), strict=True):
            drawn = 0
            for i, (label, x, (_, mean, lo, hi, _)) in enumerate(zip(labels, xs, curves, strict=True)):
                ok = np.isfinite(x) & (x >= x_from)
                if ok.sum():
                    color = cmap(i % cmap.N)
                    ax.plot(x[ok], mean[ok], color=color, label=label, marker="." if ok.sum() < 30 else None)
                    ax.fill_between(x[ok], lo[ok], hi[ok], color=color, alpha=0.2, linewidth=0)
                    drawn += 1
            ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:.4f}")
            if not drawn:
                ax.text(0.5, 0.5, f"no val loss vs {mode} in these runs", transform=ax.transAxes, ha="center")
            ax.set(xlabel=xlabel, ylabel="val loss")
            ax.grid(alpha=0.3)
        if starts and max(max(c[3], default=0) for c in curves) > 1.1 * max(starts):
            axes[0].set_ylim(top=1.05 * max(starts))  # a diverged seed would flatten every other curve
        axes[0].set_title(f"val loss vs {mode} (mean over seeds, min-max band)")
        axes[1].set_title("second half, zoomed")
        axes[0].legend(fontsize="small")
        fig.tight_layout()
        paths.append(out / f"val_loss_vs_{mode}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def compare(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.dirs]
    runs = load_runs(paths)
    where = ", ".join(map(str, paths))
    if not any(r.records for r in runs):
        failed = f" ({len(runs)} failed run(s) without metrics)" if runs else ""
        raise InputError(f"no run directories (with metrics.jsonl and config.yaml) under {where}{failed}")
    groups = group_runs(runs)
    configs = [g[0].config for g in groups]
    labels = label_groups(configs)
    first = [summarise(g, math.nan) for g in groups]  # target-free: final losses choose the baseline
    base, note = choose_baseline(labels, configs, first, args.baseline)
    if args.target is not None:
        target, rule = args.target, "--target"
    else:
        bests = [s["best_val_loss"] for s in first[base]["seeds"] if s["best_val_loss"] is not None]
        if not bests:
            raise InputError(f"baseline {labels[base]} has no finite val loss; give --target")
        target, rule = max(bests), "max over baseline seeds of their best val loss"
    summaries = [summarise(g, target) for g in groups]
    b = summaries[base]
    finals = lambda x: [v["final_val_loss"] for v in x["seeds"] if v["final_val_loss"] is not None]
    steps = lambda x: [v["steps_to_target"] for v in x["seeds"] if v["steps_to_target"] is not None]
    tests = [None if i == base else {"final_val_loss": welch(finals(s), finals(b)),
                                     "steps_to_target": welch(steps(s), steps(b))} for i, s in enumerate(summaries)]
    for key in ("final_val_loss", "steps_to_target"):  # each family of tests against the baseline, corrected
        family = [t[key] for t in tests if t is not None and t[key] is not None]
        for cmp, adjusted in zip(family, holm([c["p"] for c in family]), strict=True):
            cmp["p_holm"] = adjusted
    for i, (label, s) in enumerate(zip(labels, summaries, strict=True)):
        config = {k: v if not isinstance(v, float) or math.isfinite(v) else str(v) for k, v in configs[i].items()}
        vs = tests[i]
        verdict_ = "baseline" if vs is None else verdict(vs["final_val_loss"], args.alpha, s["diverged"])
        summaries[i] = {"label": label, "baseline": i == base, "verdict": verdict_,
                        "config": {k: config[k] for k in sorted(canonical(config))}, **s,
                        "vs_baseline": vs}  # fmt: skip
    loss_key = lambda s: (s["final_val_loss"]["mean"] is None, s["final_val_loss"]["mean"] or 0.0, s["label"])
    rows = [summaries[base]] + sorted((s for i, s in enumerate(summaries) if i != base), key=loss_key)
    n_failed = sum(s["failed"] for s in rows)
    n_tests = sum(t is not None and t["final_val_loss"] is not None and t["final_val_loss"]["p"] is not None
                  for t in tests)  # fmt: skip
    header = (f"target val loss {target:.4f} ({rule}); baseline {labels[base]}; alpha {args.alpha}, Holm-corrected "
              f"over {n_tests} comparison(s); "
              f"{len(runs)} runs ({n_failed} failed) in {len(groups)} configurations")  # fmt: skip
    header += f"\n\nnote: {note}" if note else ""
    out = Path(args.out) if args.out else (paths[0] if len(paths) == 1 else Path.cwd() / "compare")
    out.mkdir(parents=True, exist_ok=True)
    cells = [table_row(r) for r in rows]
    print(header + "\n\n" + render_table(cells) + "\n")
    (out / "compare.md").write_text(render_markdown(cells, header))
    doc = {"target": target, "target_rule": rule, "baseline": labels[base], "alpha": args.alpha, "runs": len(runs),
           "failed_runs": n_failed, "note": note or None, "configurations": rows}  # fmt: skip
    (out / "compare.json").write_text(json.dumps(doc, indent=1, default=str, allow_nan=False) + "\n")
    pngs = plot(groups, labels, target, out)
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, " + ", ".join(map(str, pngs)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="run directories or directories to search (e.g. a sweep dir)")
    parser.add_argument("--target", type=float, default=None, help="target val loss (default: see above)")
    parser.add_argument("--baseline", default=None, help="a configuration label or optimizer name (default adamw)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level of the verdict")
    parser.add_argument("--out", default=None, help="output directory")
    args = parser.parse_args(argv)
    if not 0 < args.alpha < 1 or (args.target is not None and not math.isfinite(args.target)):
        parser.error("--alpha must be in (0, 1) and --target finite")
    try:
        return compare(args)
    except InputError as e:
        exit_with_error(str(e))


if __name__ == "__main__":
    sys.exit(main())
