"""Optimizer-state and per-layer statistics under DDP and FSDP describe the whole model: every key equals
the single-process value (tests/test_optim_stats.py's `run`, the trainer's own wrapping)."""

from __future__ import annotations

import functools
import gc
import json
import math
import os
import subprocess
import sys

import torch
import torch.distributed as dist
from conftest import REPO
from test_optim_stats import REL, run

from optim.builder import load_all
from optim.sophia import gnb_hessian_update
from trainer.config import DistributedConfig
from trainer.distributed import Dist, wrap

# This file is also the worker: `torchrun --nproc_per_node=2 tests/test_optim_stats_distributed.py {ddp|fsdp}` runs each
# optimizer on 2 CPU ranks (gloo), both ranks on the same whole batch, so the averaged gradient and every
# step are one process's, and rank 0 prints how far every statistic (per-layer and opt/) is from one process.

FSDP_VERIFIED = sorted(name for name, spec in load_all().items() if spec.fsdp.verified)
DIST_NAMES = {"fsdp": FSDP_VERIFIED, "ddp": ("adamw", "lion", "muon")}
DIST_EXTRA = {"sophia": ["optimizer.rho=50"], "rmsprop": ["optimizer.momentum=0.5", "optimizer.centered=true"]}


def _refresh_hessian(model, optimizer, x) -> None:
    torch.manual_seed(5)  # the same sampled labels on every rank and in one process
    gnb_hessian_update(model, optimizer, x)


def _dist_stats(name: str, wrapper=None) -> dict:
    refresh = _refresh_hessian if name == "sophia" else None
    return run(name, *DIST_EXTRA.get(name, []), after_first=refresh, wrap=wrapper).stats


def _wrapper(strategy: str):
    """The trainer's own wrapping (DDP, or fully_shard per block then the root), in fp32."""
    d = Dist(dist.get_rank(), dist.get_world_size(), 0, strategy)
    return lambda model: wrap(model, d, torch.device("cpu"), DistributedConfig(param_dtype="fp32"))


def dist_worker(strategy: str) -> None:
    names = DIST_NAMES[strategy]
    whole = {name: _dist_stats(name) for name in names} if os.environ["RANK"] == "0" else {}  # before the group
    dist.init_process_group("gloo")
    for name in names:
        got = _dist_stats(name, _wrapper(strategy))
        if dist.get_rank() == 0:
            want = whole[name]
            rel = [abs(got[k] - v) / max(abs(v), 1e-30) for k, v in want.items() if k in got and math.isfinite(v)]
            print(json.dumps({"optimizer": name, "missing": sorted(set(want) ^ set(got)), "max_rel": max(rel)}))
    gc.collect()  # DDP wrappers freed before the group goes (else gloo may abort at exit)
    dist.barrier()
    dist.destroy_process_group()


@functools.cache
def dist_results(strategy: str) -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, strategy]
    proc = subprocess.run(cmd, cwd=REPO, env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["optimizer"]: r for r in records}


def test_statistics_under_fsdp_describe_the_whole_model():
    results = dist_results("fsdp")
    assert set(results) == set(FSDP_VERIFIED)
    for r in results.values():
        assert not r["missing"] and r["max_rel"] < REL, r


def test_statistics_under_ddp_describe_the_whole_model():
    results = dist_results("ddp")
    assert set(results) == set(DIST_NAMES["ddp"])
    for r in results.values():
        assert not r["missing"] and r["max_rel"] < REL, r


if __name__ == "__main__":
    dist_worker(sys.argv[1])
