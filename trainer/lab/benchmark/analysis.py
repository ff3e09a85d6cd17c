"""From the runs to the numbers of the report: per size and table (tuned, default), the baseline's curve
and its fit, and per optimizer and budget the final losses, the speedup with its interval, the steps to
the baseline's loss and the significance of the difference.

Conventions (docs/comparing.md): a seed that failed or diverged has an infinite loss, so a mean with one
is infinite and its speedup 0; Welch's test runs on the finished seeds, but an optimizer with a failed
seed is never called better. The p-values of one size, table and budget (one test per optimizer against
the baseline) are Holm-corrected together.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

from trainer.lab.benchmark.config import BenchmarkConfig
from trainer.lab.benchmark.protocol import Outcome
from trainer.lab.benchmark.speedup import (
    baseline_points,
    bootstrap_laws,
    fit_check,
    fit_power_law,
    mean_loss,
    speedup,
    speedup_interval,
)
from trainer.lab.benchmark.stats import holm, steps_to_target, welch

TABLES = ("tuned", "default")


def _counts(results) -> dict[str, int]:
    out = {"ok": 0, "diverged": 0, "failed": 0, "pending": 0}
    for r in results:
        out[r.status] += 1
    return out


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    return (statistics.fmean(xs) if xs else None), (statistics.stdev(xs) if len(xs) > 1 else None)


def tuning_summary(o: Outcome) -> dict:
    s, t = o.setting, o.tune
    statuses = _counts(r for _, r in o.tune_runs)
    axes = [{"key": a.key, "default": s.defaults[a.key], "tuned": t.best[a.key] if t else None,
             "status": t.status[a.key] if t else "unsearched"} for a in s.axes]  # fmt: skip
    trials = [{"values": j.hparams, "loss": r.loss if math.isfinite(r.loss) else None, "status": r.status,
               "reason": r.reason, "path": str(r.path)} for j, r in o.tune_runs]  # fmt: skip
    return {"optimizer": s.optimizer, "trials": len(o.tune_runs), "finished": t is not None, "runs": statuses,
            "best_loss": t.best_loss if t and math.isfinite(t.best_loss) else None, "axes": axes,
            "history": trials}  # fmt: skip


def table_summary(cfg: BenchmarkConfig, outcomes: list[Outcome], table: str, rng: np.random.Generator) -> dict:
    """One size's table (outcomes of one size): baseline curve and fit, then every optimizer per budget."""
    by_opt = {o.setting.optimizer: o.tables.get(table, {}) for o in outcomes}
    base = by_opt.get(cfg.baseline, {})
    curve = {b: [r.loss for _, r in runs] for b, runs in base.items()}
    d, y = baseline_points(curve)
    law = fit_power_law(d, y)
    out = {"fit": None, "rows": [], "baseline_budgets": sorted(base)}
    laws = []
    if law is not None:
        out["fit"] = {"E": law.E, "A": law.A, "alpha": law.alpha, **fit_check(law, d, y),
                      "failed_seeds": sum(not math.isfinite(x) for xs in curve.values() for x in xs)}  # fmt: skip
        laws = bootstrap_laws(curve, cfg.bootstrap, rng)
    lo_b, hi_b = (min(base), max(base)) if base else (None, None)
    for budget in sorted({b for runs in by_opt.values() for b in runs}):
        base_runs = base.get(budget, [])
        target_losses = [r.final_loss for _, r in base_runs if r.status == "ok"]
        target = statistics.fmean(target_losses) if target_losses else None
        rows = []
        for name, runs_by_budget in by_opt.items():
            runs = runs_by_budget.get(budget)
            if not runs:
                continue
            results = [r for _, r in runs]
            finite = [r.final_loss for r in results if r.status == "ok"]
            mean, std = _mean_std(finite)
            row = {"optimizer": name, "budget": budget, "steps": runs[0][0].steps, "runs": _counts(results),
                   "seeds": [{"seed": j.seed, "status": r.status, "loss": r.final_loss, "path": str(r.path),
                              "reason": r.reason} for j, r in runs],
                   "mean": mean, "std": std, "speedup": None, "interval": None, "extrapolated": False,
                   "steps_to_target": None, "steps_std": None, "reached": 0, "welch": None, "p_holm": None,
                   "verdict": "n/a"}  # fmt: skip
            losses = [r.loss for r in results]
            if law is not None and not any(r.status == "pending" for r in results):
                row["speedup"] = speedup(law, budget, losses)
                row["interval"] = speedup_interval(laws, budget, losses, rng, cfg.confidence)
                d_eq = law.budget_for(mean_loss(losses))
                row["extrapolated"] = name != cfg.baseline and bool(d_eq > 0 and not lo_b <= d_eq <= hi_b)
            if target is not None:
                reach = [steps_to_target(r.evals, target) for r in results if r.status == "ok"]
                steps = [x[0] for x in reach if x is not None]
                row["steps_to_target"], row["steps_std"] = _mean_std(steps)
                row["reached"] = len(steps)
            if name != cfg.baseline:
                row["welch"] = welch(finite, target_losses)
            rows.append(row)
        pvals = [r["welch"]["p"] if r["welch"] else None for r in rows]
        for row, p in zip(rows, holm(pvals), strict=True):
            row["p_holm"] = p
            row["verdict"] = verdict(row, p, cfg.alpha, cfg.baseline)
        out["rows"] += rows
    return out


def verdict(row: dict, p_holm: float | None, alpha: float, baseline: str) -> str:
    bad = row["runs"]["diverged"] + row["runs"]["failed"]
    if row["optimizer"] == baseline:
        return "baseline"
    if row["runs"]["pending"]:
        return "incomplete"
    w = row["welch"]
    if w is None or p_holm is None:
        return f"unstable ({bad} failed)" if bad else "n/a"
    if p_holm < alpha and w["diff"] > 0:
        return "worse"
    if bad:
        return f"unstable ({bad} failed)"  # its finished seeds alone would flatter it
    return "better" if p_holm < alpha else "no sig. diff."


def analyze(cfg: BenchmarkConfig, outcomes: list[Outcome], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    sizes = []
    for size in cfg.sizes:
        mine = [o for o in outcomes if o.setting.size.name == size.name]
        s0 = mine[0].setting
        entry = {"name": size.name, "params": s0.params, "model": list(size.model),
                 "tokens_per_step": s0.tokens_per_step,
                 "budgets": sorted({b for o in mine for t in o.tables.values() for b in t}),
                 "tuning": [tuning_summary(o) for o in mine], "tables": {}}  # fmt: skip
        for table in TABLES:
            if any(table in o.tables for o in mine):
                entry["tables"][table] = table_summary(cfg, mine, table, rng)
        sizes.append(entry)
    every = [r for o in outcomes for r in _all_results(o)]
    train_s = sum(r.train_s for r in every if r.train_s and math.isfinite(r.train_s))
    return {"sizes": sizes, "runs": _counts(every), "train_seconds": train_s,
            "trials": cfg.trials, "seeds": list(cfg.seeds)}  # fmt: skip


def _all_results(o: Outcome):
    seen = {}
    for j, r in o.tune_runs:
        seen[j.key] = r
    for table in o.tables.values():
        for runs in table.values():
            for j, r in runs:
                seen[j.key] = r
    return seen.values()
