"""The protocol, run end to end: tune every optimizer alike, confirm, and run the defaults beside them.

For each model size and optimizer (a Setting):
  1. tune: coordinate descent (tuner.py) from the optimizer's defaults, `trials` runs at the size's tuning
     budget with `tune_seed`; the coordinate-descent searches of all settings advance together, so each
     launch holds one step of every search (and fans out over a cluster)
  2. tuned: the best configuration at every budget with every seed in `seeds`, each a full run
  3. default: the defaults at the same budgets and seeds (the untuned comparison)
The baseline also runs its `baseline_budgets` (in 2 and 3), which extend its loss curve.

Nothing is kept but the run directories: every step of the searches is replayed from the finished runs it
finds, so a killed benchmark continues where it stopped, and a finished one rebuilds its report without
running anything.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from trainer.lab.benchmark.config import BenchmarkConfig, Setting, tune_budget
from trainer.lab.benchmark.jobs import Job, make_job
from trainer.lab.benchmark.launch import Launcher
from trainer.lab.benchmark.results import RunResult, read_run
from trainer.lab.benchmark.tuner import TuneResult, coordinate_descent


@dataclass
class Outcome:
    """Everything one setting ran: its search and its runs per table and budget."""

    setting: Setting
    tune: TuneResult | None = None  # None until its search has finished
    tune_runs: list[tuple[Job, RunResult]] = field(default_factory=list)
    tables: dict[str, dict[float, list[tuple[Job, RunResult]]]] = field(default_factory=dict)  # tuned|default


@dataclass
class Plan:
    """What is left: runs per phase (tuned is an upper bound until tuning ends: some may equal default runs)."""

    todo: dict[str, int]  # phase -> runs still to run
    total: dict[str, int]  # phase -> runs in the whole benchmark
    jobs: list[Job]  # the runs still to run that are known now (all but the unplanned tuning and tuned ones)
    tuning_left: dict[str, int]  # "size/optimizer" -> tuning trials still to run

    @property
    def runs(self) -> int:
        return sum(self.todo.values())


class Benchmark:
    def __init__(self, cfg: BenchmarkConfig, settings: list[Setting], out: Path, launcher: Launcher,
                 progress: bool = True):  # fmt: skip
        self.cfg, self.settings, self.out, self.launcher = cfg, settings, out, launcher
        self.runs_dir = out / "runs"
        self.progress = progress
        self.bar: tqdm | None = None
        self.failures = 0

    # ---- runs and their directories ---------------------------------------------------------------

    def result(self, job: Job) -> RunResult:
        return read_run(self.runs_dir / job.key, job.steps)

    def budgets(self, s: Setting) -> list[float]:
        extra = s.size.baseline_budgets if s.optimizer == self.cfg.baseline else []
        return sorted({*s.size.budgets, *extra})

    def table_jobs(self, s: Setting, values: dict[str, float], phase: str) -> list[Job]:
        return [make_job(self.cfg, s, values, b, seed, phase) for b in self.budgets(s) for seed in self.cfg.seeds]

    def execute(self, jobs: list[Job], phase: str) -> None:
        """Run the jobs that have not run yet (one launch), and note the launch's wall time in ledger.jsonl."""
        todo = list({j.key: j for j in jobs if not self.result(j).done}.values())
        if not todo:
            return
        if self.bar is not None:
            self.bar.set_postfix(phase=phase, failed=self.failures)
        start = time.time()
        try:
            self.launcher.run(todo, self.runs_dir, self._done)
        finally:  # an interrupted launch used the machine too
            entry = {"phase": phase, "runs": len(todo), "wall_s": round(time.time() - start, 1),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start))}  # fmt: skip
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "ledger.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

    def _done(self, job: Job) -> None:
        if self.result(job).status != "ok":
            self.failures += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(phase=job.phase, failed=self.failures)

    # ---- the phases -----------------------------------------------------------------------------------

    def tune(self, run: bool) -> tuple[list[Outcome], dict[str, int]]:
        """Advance every setting's search together; with run=False, replay only what has finished and
        return the trials each search still needs."""
        outcomes = [Outcome(s) for s in self.settings]
        searches = {i: coordinate_descent(s.axes, self.cfg.trials) for i, s in enumerate(self.settings)}
        asks = {i: next(search) for i, search in searches.items()}
        left = {}
        while asks:
            jobs = {i: [make_job(self.cfg, self.settings[i], values, tune_budget(self.settings[i].size),
                                 self.cfg.tune_seed, "tune") for values in ask] for i, ask in asks.items()}  # fmt: skip
            if not run:
                for i in [i for i in asks if not all(self.result(j).done for j in jobs[i])]:
                    left[self.name(i)] = self.cfg.trials - len(outcomes[i].tune_runs)
                    del asks[i]
            else:
                self.execute([j for js in jobs.values() for j in js], "tune")
            for i in list(asks):
                runs = [(j, self.result(j)) for j in jobs[i]]
                outcomes[i].tune_runs += runs
                try:
                    asks[i] = searches[i].send([r.loss for _, r in runs])
                except StopIteration as stop:
                    outcomes[i].tune = stop.value
                    del asks[i]
        return outcomes, left

    def name(self, i: int) -> str:
        return f"{self.settings[i].size.name}/{self.settings[i].optimizer}"

    def plan(self) -> tuple[Plan, list[Outcome]]:
        """Count what is left without running anything."""
        outcomes, left = self.tune(run=False)
        todo = {"tune": sum(left.values()), "tuned": 0, "default": 0}
        per_table = [len(self.table_jobs(o.setting, {}, "")) for o in outcomes]
        total = {"tune": self.cfg.trials * len(outcomes), "tuned": sum(per_table)}
        total["default"] = total["tuned"] if self.cfg.defaults_table else 0
        known: dict[str, Job] = {}
        for o in outcomes:
            if self.cfg.defaults_table:
                known |= {j.key: j for j in self.table_jobs(o.setting, o.setting.defaults, "default")}
        pending_default = {k for k, j in known.items() if not self.result(j).done}
        todo["default"] = len(pending_default)
        for o, n in zip(outcomes, per_table, strict=True):
            if o.tune is None:
                todo["tuned"] += n
            else:
                tuned = {j.key: j for j in self.table_jobs(o.setting, o.tune.best, "tuned")}
                new = {k for k, j in tuned.items() if k not in known and not self.result(j).done}
                todo["tuned"] += len(new)
                known |= {k: tuned[k] for k in new}
        jobs = [j for j in known.values() if not self.result(j).done]
        return Plan(todo, total, jobs, left), outcomes

    def run(self, plan: Plan) -> list[Outcome]:
        """Run whatever is left (tuning, then the tuned and default tables in one launch); the outcomes."""
        with tqdm(total=plan.runs, unit="run", desc="benchmark", disable=not self.progress, dynamic_ncols=True) as bar:
            self.bar = bar
            outcomes, _ = self.tune(run=True)
            tables = []
            for o in outcomes:
                tables += self.table_jobs(o.setting, o.tune.best, "tuned")
                if self.cfg.defaults_table:
                    tables += self.table_jobs(o.setting, o.setting.defaults, "default")
            bar.total = bar.n + len({j.key for j in tables if not self.result(j).done})  # exact now
            bar.refresh()
            self.execute(tables, "confirm")
            self.bar = None
        return self.collect(outcomes)

    def collect(self, outcomes: list[Outcome]) -> list[Outcome]:
        """Fill each outcome's tables from the run directories (pending runs stay pending)."""
        for o in outcomes:
            values = {"tuned": o.tune.best if o.tune else None}
            if self.cfg.defaults_table:
                values["default"] = o.setting.defaults
            for table, v in values.items():
                if v is None:
                    continue
                runs: dict[float, list] = {}
                for j in self.table_jobs(o.setting, v, table):
                    runs.setdefault(j.budget, []).append((j, self.result(j)))
                o.tables[table] = runs
        return outcomes


def machine_seconds(out: Path) -> float:
    """Wall seconds of every launch this benchmark made (ledger.jsonl), across all its invocations."""
    total = 0.0
    try:
        for line in (out / "ledger.jsonl").read_text().splitlines():
            try:
                total += float(json.loads(line)["wall_s"])
            except (ValueError, KeyError, TypeError):
                pass
    except OSError:
        pass
    return total if math.isfinite(total) else 0.0
