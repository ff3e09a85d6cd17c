"""Run train.py with a failure injected on one rank (tests/test_distributed_failures.py launches it with torchrun).

    FAIL_RANK=1 FAIL_AT_STEP=7 torchrun --standalone --nproc_per_node=2 tests/fail_on_rank.py <train.py overrides>

The rank FAIL_RANK raises `RuntimeError("injected failure at step N")` when it is about to run optimizer step
FAIL_AT_STEP (counted from 1, so a run resumed past that step does not fail). With FAIL_ON_ATTEMPT=k it fails
only when TORCHELASTIC_RESTART_COUNT is k (torchrun's elastic restarts count from 0). The environment
variables are read here only; production code has no test hooks.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    import trainer.loop as loop

    fail_rank, fail_at = int(os.environ["FAIL_RANK"]), int(os.environ["FAIL_AT_STEP"])
    attempt = os.environ.get("FAIL_ON_ATTEMPT")
    armed = int(os.environ.get("RANK", 0)) == fail_rank and (
        attempt is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == int(attempt)
    )
    original_fit, original_train_step = loop.fit, loop.train_step
    done = {"step": 0}

    def fit(run, metrics):  # trainer/entry/run.py imports fit from trainer.loop when it runs, so it gets this one
        done["step"] = run.progress.step
        return original_fit(run, metrics)

    def train_step(*args, **kwargs):  # fit looks train_step up in trainer.loop's globals at each step
        if armed and done["step"] + 1 == fail_at:
            print(f"fail_on_rank: raising at {time.time():.3f}", file=sys.stderr, flush=True)  # for the test's clock
            raise RuntimeError(f"injected failure at step {fail_at}")
        done["step"] += 1
        return original_train_step(*args, **kwargs)

    loop.fit, loop.train_step = fit, train_step
    sys.argv = [str(REPO / "train.py"), *sys.argv[1:]]
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")


if __name__ == "__main__":
    main()
