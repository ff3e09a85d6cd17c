"""report.md, report.json and the figures, from analysis.analyze()'s numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from trainer.lab.benchmark.analysis import TABLES
from trainer.lab.benchmark.config import BenchmarkConfig, tune_budget

FLAGS = {"interior": "", "edge": " **[edge]**", "bound": " [bound]", "unsearched": " **[unsearched]**"}
TITLES = {"tuned": "tuned hyperparameters", "default": "default hyperparameters"}


def _f(x, spec: str = ".4f", na: str = "n/a") -> str:
    if x is None:
        return na
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def _short(key: str) -> str:
    return key.removeprefix("optimizer.")


def _speedup_cell(row: dict) -> str:
    if row["speedup"] is None:
        return "n/a"
    ci = row["interval"]
    cell = f"{_f(row['speedup'], '.2f')} [{_f(ci[0], '.2f')}, {_f(ci[1], '.2f')}]" if ci else _f(row["speedup"], ".2f")
    return cell + (" (extrap.)" if row["extrapolated"] else "")


def _loss_cell(row: dict) -> str:
    n = sum(row["runs"].values())
    cell = f"{_f(row['mean'])} ± {_f(row['std'])}"
    return cell + (f" ({row['runs']['ok']}/{n} ok)" if row["runs"]["ok"] < n else "")


def _welch_cell(row: dict) -> str:
    w = row["welch"]
    if w is None:
        return "baseline" if row["verdict"] == "baseline" else "n/a"
    return f"{w['diff']:+.4f} (p={_f(w['p'], '.3g')}, Holm {_f(row['p_holm'], '.3g')})"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(esc, r)) + " |" for r in rows])


def headline(result: dict, table: str, optimizers: list[str]) -> str:
    """Speedup over the baseline per optimizer (rows) and size x budget (columns)."""
    cols = [(s, b) for s in result["sizes"] for b in s["budgets"] if table in s["tables"]]
    cols = [(s, b) for s, b in cols if any(r["budget"] == b and r["optimizer"] != optimizers[0]
                                           for r in s["tables"][table]["rows"])]  # fmt: skip
    rows = []
    for name in optimizers:
        cells = []
        for s, b in cols:
            row = next((r for r in s["tables"][table]["rows"] if r["optimizer"] == name and r["budget"] == b), None)
            cells.append(_speedup_cell(row) if row else "")
        rows.append([name, *cells])
    header = [f"{s['name']} ({s['params'] / 1e6:.2f}M), {b:g} tok/param" for s, b in cols]
    return _md_table(["optimizer", *header], rows)


def tuning_table(size: dict) -> str:
    rows = []
    for t in size["tuning"]:
        hp = "; ".join(f"{_short(a['key'])} {_f(a['default'], '.4g')} → {_f(a['tuned'], '.4g')}{FLAGS[a['status']]}"
                       for a in t["axes"])  # fmt: skip
        bad = t["runs"]["diverged"] + t["runs"]["failed"]
        rows.append([t["optimizer"], f"{t['trials']}", f"{bad}", _f(t["best_loss"]), hp])
    return _md_table(["optimizer", "trials", "failed/diverged", "best tuning loss", "default → tuned"], rows)


def fit_text(fit: dict | None, name: str) -> str:
    if fit is None:
        return (f"No fit: {name}'s loss does not fall with the budget, or it has fewer than 3 finished budgets, "
                "so no speedup can be estimated.")  # fmt: skip
    lof = fit["lack_of_fit_p"]
    check = (f"lack-of-fit F-test p = {lof:.3g} (df {fit['lack_of_fit_df'][0]}, {fit['lack_of_fit_df'][1]}): "
             + ("no evidence against the curve" if lof >= 0.05 else "**the curve misses the means more than seed "
                "noise explains: read the speedups as rough**")) if lof is not None else (
             "no lack-of-fit test (it needs more than 3 budgets and 2+ seeds each)")  # fmt: skip
    resid = ", ".join(f"{b['budget']:g}: {b['residual']:+.4f} (sem {_f(b['sem'], '.4f')})" for b in fit["budgets"])
    failed = f"; {fit['failed_seeds']} failed seed(s) left out of the fit" if fit["failed_seeds"] else ""
    return (f"L(D) = {fit['E']:.4f} + {fit['A']:.4f} · D^-{fit['alpha']:.4f} (D in tokens per parameter); "
            f"R² = {_f(fit['r2'], '.5f')}, RMSE {fit['rmse']:.4f}; {check}. Residual of each budget's mean: "
            f"{resid}{failed}.")  # fmt: skip


def results_table(tab: dict, baseline: str) -> str:
    rows = []
    for r in tab["rows"]:
        steps = "n/a" if r["steps_to_target"] is None else f"{r['steps_to_target']:.0f} ± {_f(r['steps_std'], '.0f')}"
        n_ok = r["runs"]["ok"]
        rows.append([r["optimizer"], f"{r['budget']:g}", str(r["steps"]), _loss_cell(r), _speedup_cell(r),
                     f"{steps} ({r['reached']}/{n_ok})", _welch_cell(r), r["verdict"]])  # fmt: skip
    header = ["optimizer", "tok/param", "steps", "final val loss", "speedup [CI]", f"steps to {baseline}'s loss",
              f"Δ loss vs {baseline}", "verdict"]  # fmt: skip
    return _md_table(header, rows)


def failures(result: dict) -> list[list[str]]:
    rows = []
    for s in result["sizes"]:
        for t in s["tuning"]:
            for h in t["history"]:
                if h["status"] not in ("ok", "pending"):
                    vals = ", ".join(f"{_short(k)}={v:.4g}" for k, v in h["values"].items())
                    rows.append([s["name"], "tuning", t["optimizer"], "", "", h["status"],
                                 f"{vals}: {h['reason']} ({h['path']})"])  # fmt: skip
        for table, tab in s["tables"].items():
            for r in tab["rows"]:
                for seed in r["seeds"]:
                    if seed["status"] not in ("ok", "pending"):
                        rows.append([s["name"], table, r["optimizer"], f"{r['budget']:g}", str(seed["seed"]),
                                     seed["status"], f"{seed['reason']} ({seed['path']})"])  # fmt: skip
    return rows


def _budget_axis(ax, budgets) -> None:
    """A log axis labelled at the budgets themselves (5, 10, 20), not at powers of ten."""
    ax.set_xscale("log")
    ax.set_xticks(sorted(set(budgets)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def plot_losses(result: dict, baseline: str, path: Path) -> None:
    sizes = result["sizes"]
    tables = [t for t in TABLES if any(t in s["tables"] for s in sizes)]
    fig, axes = plt.subplots(len(sizes), len(tables), figsize=(6 * len(tables), 4.2 * len(sizes)), squeeze=False)
    names = list(dict.fromkeys(r["optimizer"] for s in sizes for tab in s["tables"].values() for r in tab["rows"]))
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    for i, s in enumerate(sizes):
        for k, table in enumerate(tables):
            ax, tab = axes[i][k], s["tables"].get(table)
            if tab is None:
                ax.set_visible(False)
                continue
            for name in names:
                rows = [r for r in tab["rows"] if r["optimizer"] == name]
                xs = [r["budget"] for r in rows if r["mean"] is not None]
                ax.plot(xs, [r["mean"] for r in rows if r["mean"] is not None], "o-", color=colors[name], label=name)
                for r in rows:
                    for seed in r["seeds"]:
                        if seed["loss"] is not None and math.isfinite(seed["loss"]):
                            ax.plot(r["budget"], seed["loss"], ".", color=colors[name], alpha=0.4)
            fit = tab["fit"]
            if fit is not None and tab["baseline_budgets"]:
                d = np.geomspace(min(tab["baseline_budgets"]) / 1.5, max(tab["baseline_budgets"]) * 1.5, 100)
                ax.plot(d, fit["E"] + fit["A"] * d ** -fit["alpha"], "--", color="black", linewidth=1,
                        label=f"{baseline} fit E + A·D^-α")  # fmt: skip
            _budget_axis(ax, [r["budget"] for r in tab["rows"]])
            ax.set(xlabel="budget (tokens per parameter)", ylabel="final val loss",
                   title=f"{s['name']} ({s['params'] / 1e6:.2f}M params), {TITLES[table]}")  # fmt: skip
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_speedups(result: dict, baseline: str, path: Path) -> None:
    sizes = result["sizes"]
    tables = [t for t in TABLES if any(t in s["tables"] for s in sizes)]
    fig, axes = plt.subplots(1, len(tables), figsize=(6.5 * len(tables), 4.5), squeeze=False)
    names = list(dict.fromkeys(r["optimizer"] for s in sizes for tab in s["tables"].values() for r in tab["rows"]))
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    markers = "osD^v<>"
    for k, table in enumerate(tables):
        ax = axes[0][k]
        for i, s in enumerate(sizes):
            for name in names:
                if name == baseline or table not in s["tables"]:
                    continue
                rows = [r for r in s["tables"][table]["rows"] if r["optimizer"] == name and r["speedup"] is not None]
                if not rows:
                    continue
                x = np.array([r["budget"] for r in rows]) * (1 + 0.03 * names.index(name))  # spread the bars
                y = np.array([min(r["speedup"], 10.0) for r in rows])
                lo = np.array([min(r["interval"][0], 10.0) if r["interval"] else np.nan for r in rows])
                hi = np.array([min(r["interval"][1], 10.0) if r["interval"] else np.nan for r in rows])
                ax.errorbar(x, y, yerr=[np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)], color=colors[name],
                            marker=markers[i % len(markers)], linestyle="-" if i == 0 else ":", capsize=3,
                            label=f"{name}, {s['name']} ({s['params'] / 1e6:.2f}M)")  # fmt: skip
        ax.axhline(1.0, color="black", linewidth=1)
        _budget_axis(ax, [b for s in sizes for b in s["budgets"]])
        ax.set(xlabel="budget (tokens per parameter)", ylabel=f"speedup over {baseline} (data saved)",
               title=f"{TITLES[table]} ({result.get('confidence', 0.95):.0%} intervals, capped at 10)")  # fmt: skip
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(cfg: BenchmarkConfig, result: dict, header: dict) -> str:
    b, parts = cfg.baseline, []
    machine_h = header["machine_s"] / 3600
    runs = result["runs"]
    parts.append(f"# Optimizer benchmark ({header['preset']})\n")
    parts.append(f"Command: `{header['command']}`  \nCommit: {header['commit']}; written {header['date']}; "
                 f"device: {header['device']}.\n")  # fmt: skip
    parts.append(f"**Machine time:** {machine_h:.2f} h of launches on the machine that ran them (ledger.jsonl, "
                 f"every invocation summed), of which {result['train_seconds'] / 3600:.2f} h inside training steps. "
                 f"Runs: {sum(runs.values())} ({runs['ok']} ok, {runs['diverged']} diverged, {runs['failed']} "
                 f"failed, {runs['pending']} not run).\n")  # fmt: skip
    if runs["pending"]:
        parts.append("**Incomplete:** some runs have not run; the tables below mark what is missing.\n")
    if len(cfg.seeds) < 3:
        parts.append(f"**{len(cfg.seeds)} seeds, below the protocol's 3:** the intervals (Student's t with "
                     f"{len(cfg.seeds) - 1} degree(s) of freedom) are wide, and the numbers are a test of the tools.\n")
    parts.append("## Protocol\n")
    parts.append(
        f"Every optimizer ({', '.join(cfg.optimizers)}) trains the same model, data, batch and schedule shape: "
        f"`{' '.join(cfg.regime)}`, warmup then decay to the end of each run's own budget (warmup as a fraction "
        f"of the run). Budgets are tokens per parameter (Chinchilla is about 20); every run is a full run ending "
        f"at its budget. **Tuning:** coordinate descent from each optimizer's defaults (lr, then weight decay, "
        f"warmup, betas or momentum, then its own), log-spaced grids (ratio {cfg.grid_factor:g}; 1 - beta for "
        f"betas), a best value at a grid edge extends the grid; **{cfg.trials} trials per optimizer and size, "
        f"{b} included**, at the size's tuning budget with seed {cfg.tune_seed}. **Confirmation:** the tuned "
        f"configuration at every budget with seeds {list(cfg.seeds)} (fresh seeds), and the defaults beside it. "
        f"**Speedup** = the data {b} would need to reach an optimizer's mean final loss, over the optimizer's data, "
        f"from {b}'s fitted curve; {int(100 * cfg.confidence)}% intervals from a parametric bootstrap over seeds "
        f"(each mean drawn as mean + sem·t(seeds - 1), {cfg.bootstrap} replicates; \"extrap.\": outside {b}'s "
        f"budgets). A failed or diverged seed counts as an infinite loss. Welch p-values "
        f"against {b} at each budget are Holm-corrected across the optimizers (alpha {cfg.alpha}).\n"
    )  # fmt: skip
    rows = []
    for s, size in zip(result["sizes"], cfg.sizes, strict=True):
        steps = ", ".join(f"{x:g}" for x in sorted(size.budgets))
        rows.append([s["name"], f"{s['params']:,}", " ".join(size.model), steps,
                     ", ".join(f"{x:g}" for x in size.baseline_budgets) or "none", f"{tune_budget(size):g}",
                     str(s["tokens_per_step"])])  # fmt: skip
    parts.append(_md_table(["size", "parameters", "model", "budgets (tok/param)", f"{b} only", "tuning budget",
                            "tokens/step"], rows) + "\n")  # fmt: skip
    for table in TABLES:
        if any(table in s["tables"] for s in result["sizes"]):
            parts.append(f"## Speedup over {b}, {TITLES[table]}\n")
            parts.append(headline(result, table, [b] + [o for o in cfg.optimizers if o != b]) + "\n")
    parts.append("![final loss vs budget](loss_vs_budget.png)\n\n![speedup vs budget](speedup.png)\n")
    parts.append("## Tuned hyperparameters\n")
    parts.append("**[edge]**: the best value was the last one tried on its side when the trials ran out (the optimum "
                 "may lie beyond it); [bound]: at a hard bound (0, ...); **[unsearched]**: the trials ran out first.\n")
    for s in result["sizes"]:
        parts.append(f"### {s['name']}\n\n{tuning_table(s)}\n")
    for table in TABLES:
        for s in result["sizes"]:
            tab = s["tables"].get(table)
            if tab is None:
                continue
            parts.append(f"## {s['name']}, {TITLES[table]}\n")
            parts.append(f"**{b}'s curve:** {fit_text(tab['fit'], b)}\n")
            parts.append(results_table(tab, b) + "\n")
    fails = failures(result)
    parts.append("## Failed and diverged runs\n")
    parts.append(_md_table(["size", "phase", "optimizer", "tok/param", "seed", "status", "why"], fails) + "\n"
                 if fails else "None.\n")  # fmt: skip
    return "\n".join(parts)


def _plain(obj):
    """JSON-ready: inf and nan become null (JSON has neither), paths and tuples plain."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (int, str, bool)) or obj is None:
        return obj
    return str(obj)


def write_report(cfg: BenchmarkConfig, result: dict, header: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    result = result | {"confidence": cfg.confidence}
    plot_losses(result, cfg.baseline, out / "loss_vs_budget.png")
    plot_speedups(result, cfg.baseline, out / "speedup.png")
    (out / "report.md").write_text(render(cfg, result, header))
    doc = _plain({"header": header, **result})
    (out / "report.json").write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return [out / "report.md", out / "report.json", out / "loss_vs_budget.png", out / "speedup.png"]
