"""What a run directory says about its run: finished, failed, diverged, or still to run.

The benchmark keeps no state of its own: a run is finished when its metrics.jsonl holds an evaluation at
its last step, and failed when the launcher's batch ended without that and the benchmark wrote
`benchmark.json` (status and reason) into the directory. Anything else is still to run (never started,
or killed with the benchmark), and a re-run of the benchmark runs it again (trainer.resume=auto).

Statuses:
    ok        finished, final val loss finite and below the step-0 one
    diverged  final val loss not finite or above the step-0 one, or stopped by the anomaly guard
              (non-finite steps): it failed by training, not by a crash
    failed    ended without a final evaluation for another reason (a refused config, a crash)
    pending   not run yet, or interrupted
A diverged or failed run ranks as an infinite loss: it is counted and shown, and it never wins.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "benchmark.json"


@dataclass
class RunResult:
    path: Path
    status: str  # ok | diverged | failed | pending
    final_loss: float | None = None  # the last eval's val loss (None when there is none)
    evals: list[tuple[int, float, float]] = field(default_factory=list)  # (step, val loss, train seconds)
    train_s: float | None = None  # training seconds at the end (evaluations and checkpoints excluded)
    reason: str = ""

    @property
    def done(self) -> bool:
        return self.status != "pending"

    @property
    def loss(self) -> float:
        """The loss that ranks the run: inf unless it finished well."""
        return self.final_loss if self.status == "ok" and self.final_loss is not None else math.inf


def _records(path: Path) -> list[dict]:
    by_step = {}
    try:
        lines = path.read_text().splitlines()
    except (OSError, ValueError):
        return []
    for line in lines:
        try:
            r = json.loads(line)
            by_step[int(r["step"])] = r
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a kill
    return [by_step[s] for s in sorted(by_step)]


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def read_run(path: Path, max_steps: int) -> RunResult:
    records = _records(path / "metrics.jsonl")
    evals = [(int(r["step"]), _num(r["val/loss"]), 0.0 if r["step"] == 0 else _num(r.get("time/train_s")))
             for r in records if "val/loss" in r]  # fmt: skip
    train_s = next((_num(r["time/train_s"]) for r in reversed(records) if "time/train_s" in r), None)
    final = evals[-1][1] if evals else None
    marker = _marker(path)
    nonfinite = any(not math.isfinite(_num(r.get("train/loss", 0))) for r in records)
    if evals and evals[-1][0] >= max_steps:
        bad = not math.isfinite(final) or (len(evals) > 1 and final > evals[0][1])
        reason = "final val loss not finite or above the step-0 one" if bad else ""
        return RunResult(path, "diverged" if bad else "ok", final, evals, train_s, reason)
    if marker is None:
        return RunResult(path, "pending", final, evals, train_s)
    reason = marker.get("reason", "")
    skipped = _skipped_steps(path)
    if skipped:
        reason = f"stopped after {skipped} skipped non-finite step(s) (trainer.anomaly); {reason}"
    diverged = nonfinite or skipped > 0 or bool(evals and not math.isfinite(evals[-1][1]))
    return RunResult(path, "diverged" if diverged else "failed", final, evals, train_s, reason)


def _skipped_steps(path: Path) -> int:
    """Steps the anomaly guard skipped, from train.log ("step N skipped: ..."): a run it stopped diverged."""
    try:
        return sum(" skipped: " in line for line in (path / "train.log").read_text(errors="replace").splitlines())
    except OSError:
        return 0


def _marker(path: Path) -> dict | None:
    try:
        data = json.loads((path / MARKER).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def mark_failed(path: Path, reason: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text(json.dumps({"status": "failed", "reason": reason}) + "\n")


def last_line(path: Path) -> str:
    """The last non-empty line of a run's train.log: what it was doing when it stopped."""
    try:
        lines = [line.strip() for line in (path / "train.log").read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no train.log"
    return lines[-1][:300] if lines else "empty train.log"
