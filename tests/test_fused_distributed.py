"""The fused optimizer steps (optim/fused.py) under DDP and FSDP2, on 2 CPU ranks with gloo.

tests/dist_optimizer_worker.py trains each optimizer distributed, with a checkpoint resumed halfway, next
to one process on the whole batch and one accumulating the ranks' halves ("split"), here with
optimizer.fused=true everywhere (see tests/test_distributed_optimizers.py for what matching means). Under
FSDP the kernels run on each rank's local shards and LAMB all-reduces its per-tensor sums, so every
optimizer whose spec verifies FSDP must still match; those refused under FSDP stay refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO
from test_distributed_optimizers import FSDP_REFUSED, ROUNDING_SENSITIVE, TOL

from optim import fused
from optim.builder import load_all

FUSABLE = sorted(name for name, spec in load_all().items() if issubclass(spec.config, fused.FusedConfig))


def results(strategy: str, names: list[str], cache) -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "dist_optimizer_worker.py"), strategy, "--only", *names]  # fmt: skip
    cmd += ["--set", "optimizer.fused=true"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return {r["optimizer"]: r for r in map(json.loads, (x for x in proc.stdout.splitlines() if x.startswith("{")))}


def assert_matches(r: dict) -> None:
    assert "error" not in r, r
    assert r["split_loss_rel"] < TOL and r["split_param_abs"] < TOL, r
    if r["optimizer"] in ROUNDING_SENSITIVE:
        assert r["loss_rel"] <= max(2 * r["floor_loss_rel"], TOL), r
        assert r["param_abs"] <= max(2 * r["floor_param_abs"], TOL), r
    else:
        assert r["loss_rel"] < TOL and r["param_abs"] < TOL, r


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_fused_steps_match_one_process(strategy, inductor_cache):
    names = [n for n in FUSABLE if strategy == "ddp" or n not in FSDP_REFUSED]
    got = results(strategy, names, inductor_cache)
    assert sorted(got) == names
    for r in got.values():
        assert r["refused"] is None
        assert_matches(r)
