"""Coordinate descent with a fixed number of trials, the same for every optimizer.

Start at the optimizer's defaults (trial 1). For each axis in order (axes.py), with the others held at
their current values: try one grid step either side of the current value; while the best value tried on
this line is its lowest or highest, extend the grid one more step that way (a best value at the edge
extends the grid). The best value becomes the current one, then the next axis. When a whole pass changes
nothing, the grid step halves and the passes go on. It stops after exactly `trials` distinct runs (a
point tried before costs nothing), so every optimizer gets the same number.

Each axis ends with a status from its last line search:
    interior    the best value has a worse value tried on both sides
    edge        the best value is the last tried on a side and the trials ran out before the grid could be
                extended: the optimum may lie beyond it (flagged in the report)
    bound       the best value is at a hard bound (0, a beta of 0, ...): the grid cannot go further
    unsearched  the trials ran out before this axis was reached (flagged)

A failed or diverged trial has an infinite loss, so it is never the best; it still counts as a trial.
Ties keep the current value. The search is a generator, so the caller decides how trials run:

    search = coordinate_descent(axes, trials=12)
    points = next(search)                 # a list of points to run: {axis key: value}
    points = search.send(losses)          # their final losses, in order -> the next points
    ...                                   # StopIteration.value is the TuneResult
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass, field

from trainer.lab.benchmark.axes import Axis


@dataclass
class Trial:
    values: dict[str, float]  # axis key -> value
    loss: float  # inf for a failed or diverged run


@dataclass
class TuneResult:
    best: dict[str, float]
    best_loss: float
    status: dict[str, str]  # axis key -> interior | edge | bound | unsearched
    trials: list[Trial] = field(default_factory=list)


Search = Generator[list[dict[str, float]], list[float], TuneResult]


def coordinate_descent(axes: list[Axis], trials: int) -> Search:
    if trials < 1:
        raise ValueError("trials must be at least 1")
    x = {a.key: a.start for a in axes}
    seen: dict[tuple, tuple[dict, float]] = {}  # the values of a trial -> (its grid position, its loss)
    history: list[Trial] = []
    status = {a.key: "unsearched" for a in axes}

    def values(pos: dict[str, float]) -> dict[str, float]:
        return {a.key: a.value(pos[a.key]) for a in axes}

    def ident(pos: dict[str, float]) -> tuple:
        return tuple(values(pos).values())  # two positions with the same values are one trial

    def run(points: list[dict[str, float]]) -> Generator:
        """Evaluate the positions not seen yet (as many as the trials left allow); yields to the caller."""
        fresh = list({ident(p): p for p in points if ident(p) not in seen}.values())[: trials - len(seen)]
        if fresh:
            losses = yield [values(p) for p in fresh]
            for p, loss in zip(fresh, losses, strict=True):
                loss = float(loss) if math.isfinite(float(loss)) else math.inf
                seen[ident(p)] = (dict(p), loss)
                history.append(Trial(values(p), loss))

    yield from run([x])
    step = 1.0
    while len(seen) < trials:
        changed, tried_before = False, len(seen)
        for axis in axes:
            if len(seen) >= trials:
                break
            status[axis.key], moved = yield from _line_search(axis, x, step, seen, run, trials)
            changed |= moved
        if not changed:
            if len(seen) == tried_before and step < 1e-3:
                raise ValueError("coordinate descent cannot propose a new trial: every axis is at its bounds")
            step /= 2
    return TuneResult(values(x), seen[ident(x)][1], status, history)


def _line_search(axis: Axis, x: dict, step: float, seen: dict, run, trials: int) -> Generator:
    """Move x[axis] to the best value on its line (see the module docstring): (status, whether it moved).
    The line is every trial so far that differs from x in this axis only, whatever grid step tried it."""
    x0 = x[axis.key]
    at = lambda v: x | {axis.key: v}
    others = lambda pos: {k: v for k, v in pos.items() if k != axis.key}

    def line() -> dict[float, float]:
        return {pos[axis.key]: loss for pos, loss in seen.values() if others(pos) == others(x)}

    yield from run([at(v) for v in (x0 - step, x0 + step) if axis.allowed(v)])
    while True:
        tried = line()
        best = min(tried, key=lambda v: (tried[v], v != x0))  # ties keep the current value
        lowest, highest = min(tried), max(tried)
        if best == lowest and axis.allowed(best - step):
            nxt = best - step
        elif best == highest and axis.allowed(best + step):
            nxt = best + step
        else:
            status = "interior" if lowest < best < highest else "bound"
            break
        if len(seen) >= trials:
            status = "edge"
            break
        before = len(seen)
        yield from run([at(nxt)])
        if len(seen) == before:  # the next grid value rounds to one tried already: the grid ends here
            status = "bound"
            break
    x[axis.key] = best
    return status, best != x0
