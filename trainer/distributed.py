"""Data parallelism under torchrun, `accelerate launch` or SLURM's srun: process-group set-up from the
launcher's environment, wrapping the model from outside (DDP), and the few collectives the loop needs.

The model module knows nothing of this; trainer/build.py wraps it and the loop asks `Dist` for the
rank-dependent decisions (who logs, who writes checkpoints).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from trainer.errors import ConfigError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"  # none | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.strategy != "none"


def launcher_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun / accelerate (RANK, WORLD_SIZE, LOCAL_RANK) or
    SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID); (0, 1, 0) for a plain `python train.py`."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def rendezvous_address(env) -> dict[str, str]:
    """MASTER_ADDR/PORT for a launcher that sets neither: under SLURM (srun, or submitit's tasks) the job's
    first node and a port derived from the job id (two jobs sharing a node do not collide); otherwise this
    machine (one process asked for ddp explicitly)."""
    if "SLURM_JOB_NODELIST" in env and "RANK" not in env:
        port = 20000 + int(env.get("SLURM_JOB_ID", "0").split("_")[0] or 0) % 40000
        return {"MASTER_ADDR": first_host(env["SLURM_JOB_NODELIST"]), "MASTER_PORT": str(port)}
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[003-004,010],cpu01" -> "gpu003" (zero padding kept)."""
    bracket, comma = nodelist.find("["), nodelist.find(",")
    if bracket == -1 or -1 < comma < bracket:
        return nodelist.split(",")[0]
    ranges, suffix = nodelist[bracket + 1 :].split("]", 1)
    return nodelist[:bracket] + ranges.split(",")[0].split("-")[0] + suffix.split(",")[0]


def setup(strategy: str, backend: str, timeout_s: int, device: torch.device) -> Dist:
    """Join the process group when the run is distributed (`distributed=auto`: whenever the launcher
    started several processes)."""
    rank, world, local_rank = launcher_env()
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if strategy == "none":
        if world > 1:
            raise ConfigError(f"launched with {world} processes but distributed=none: use distributed=ddp or auto")
        return Dist()
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    for key, value in rendezvous_address(os.environ).items():
        os.environ.setdefault(key, value)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return Dist(rank, world, local_rank, strategy)


def local_device(device: torch.device, d: Dist) -> torch.device:
    """Each process drives the GPU of its local rank."""
    return torch.device("cuda", d.local_rank) if device.type == "cuda" and d.enabled else device


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def wrap(model: nn.Module, d: Dist, device: torch.device, cfg=None) -> nn.Module:
    """DDP around the model, or FSDP2: fully_shard each transformer block, then the root."""
    if d.strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if d.strategy == "fsdp":
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        from models.minigpt import Block

        options = {
            "mp_policy": MixedPrecisionPolicy(
                param_dtype=DTYPES[cfg.param_dtype], reduce_dtype=DTYPES[cfg.reduce_dtype]
            ),
            "reshard_after_forward": cfg.reshard_after_forward,
        }
        if cfg.cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy()
        for block in [m for m in model.modules() if isinstance(m, Block)]:
            fully_shard(block, **options)
        fully_shard(model, **options)
    return model


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing per transformer block, applied from outside the model (state-dict keys
    are unchanged, so checkpoints move freely between runs with and without it)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from models.minigpt import Block

    apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, Block))


@contextlib.contextmanager
def grad_sync(model: nn.Module, last_micro_batch: bool):
    """Skip the gradient reduction on all but the last micro-batch of an accumulated step
    (DDP's no_sync, FSDP2's set_requires_gradient_sync)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last_micro_batch)
        yield
    elif not last_micro_batch and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def mean_over_ranks(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """The average over ranks (each rank holds the mean of an equal share of the batch)."""
    if d.enabled:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= d.world_size
    return value


def max_over_ranks(values: torch.Tensor, d: Dist) -> torch.Tensor:
    """The element-wise maximum over ranks (a collective)."""
    values = values.detach().clone()
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def any_rank(flag: bool, d: Dist, device: torch.device) -> bool:
    """True on every rank when it is true on any (so that all ranks stop at the same step)."""
    if not d.enabled:
        return flag
    return bool(max_over_ranks(torch.tensor(int(flag), device=device), d).item())


def broadcast(obj, d: Dist):
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
