"""Every optimizer of the zoo under DDP or FSDP2 against unwrapped single processes.

Run under `torchrun --standalone --nproc_per_node=2 tests/dist_optimizer_worker.py {ddp|fsdp}` (gloo,
CPU, fp32). In one process group, for every registered optimizer (and AdamW wrapped in Lookahead) it
builds a tiny MiniGPT and its optimizer (and hook) through the project's builders from the composed Hydra
config, and trains it with the loop's own `train_step` for STEPS steps, each rank taking its half of a
fixed global batch. Halfway it evaluates and checkpoints as the trainer does (in the optimizer's eval
mode), and goes on from a fresh copy resumed from that state. Rank 0 trains two references the same way
in one process: on the whole global batch, and on the ranks' halves accumulated in turn ("split": the
same sums of the same numbers as the ranks make). It prints one JSON line per optimizer: the largest
relative loss and absolute parameter differences (parameters gathered with `full_tensor()` under FSDP)
against each reference, the whole-vs-split difference of the references themselves (what fp32 rounding
alone does to the optimizer), and the start-up refusal under FSDP if there is one; refused optimizers
are not trained unless --run-refused. Used by tests/test_distributed_optimizers.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from conftest import compose_cfg
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils._pytree import tree_map_only

from models.minigpt import MiniGPT
from optim.builder import (
    BuildContext,
    HookContext,
    after_load,
    build_hook,
    build_optimizer,
    eval_mode,
    fsdp_errors,
    load_all,
)
from trainer.build import model_config
from trainer.distributed import Dist, mean_over_ranks, setup, wrap
from trainer.loop import StepContext, train_step
from trainer.runtime import grad_scaler, seed_everything

STEPS = 4
EVAL_AFTER = 2  # then an evaluation and a checkpoint resumed into a fresh copy (schedule-free: at its x)
BATCH = 8  # sequences in the global batch; each of the 2 ranks takes half
SEQ = 32
VOCAB = 64
LOOKAHEAD = "adamw+lookahead"
MODEL = {"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": SEQ, "model.vocab_size": VOCAB}
EXTRA = {
    "sophia": {"optimizer.hessian_interval": 2},  # Hessian refreshes before and after the resume
    LOOKAHEAD: {"optimizer": "adamw", "optimizer.lookahead.k": 3},  # its counter crosses the resume
}
CPU = torch.device("cpu")


@dataclass
class Case:
    name: str
    cfg: object  # the typed TrainConfig (not validated: refused optimizers are measured too)
    refused: str | None  # the one-line start-up refusal under this strategy, or None


def make_case(name: str, strategy: str, settings: list[str] = ()) -> Case:
    overrides = {
        **MODEL, "optimizer": name, **EXTRA.get(name, {}), "trainer.precision": "fp32", "trainer.device": "cpu",
        "trainer.micro_batch_size": BATCH // 2, "schedule": "constant", "schedule.warmup_steps": 0,
        "distributed": strategy, "distributed.param_dtype": "fp32", **dict(kv.split("=", 1) for kv in settings),
    }  # fmt: skip
    cfg = OmegaConf.to_object(compose_cfg([f"{k}={v}" for k, v in overrides.items()]))
    return Case(name, cfg, fsdp_errors(cfg.optimizer) if strategy == "fsdp" else None)


def global_batches(seed: int = 1234) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS training batches, the batch the last Hessian refresh peeks at, and one eval batch."""
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g) for _ in range(STEPS + 2)]
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def shares(batch: tuple[torch.Tensor, torch.Tensor], parts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batch cut into `parts` equal row ranges: rank r of `parts` ranks takes the r-th."""
    x, y = batch
    return list(zip(x.chunk(parts), y.chunk(parts), strict=True))


@dataclass
class Layout:
    """How one copy sees each global batch: a rank's share (distributed), or all of it in one process,
    whole or as the ranks' shares accumulated one after the other (`split`)."""

    d: Dist
    split: int = 1  # micro-batches per step in one process

    def micro_batches(self, batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.d.enabled:
            return [shares(batch, self.d.world_size)[self.d.rank]]
        return shares(batch, self.split)


def align_sampling_rng(step: int, d: Dist) -> None:
    """Sophia's Hessian refresh samples labels from the model, row by row from the global RNG. Seed it
    per step and let each rank first draw (and drop) the labels of the rows of the ranks before it, so
    the ranks together draw exactly the labels one process draws for the whole batch."""
    torch.manual_seed(10_000 + step)
    before = d.rank * (BATCH // d.world_size) * SEQ
    if before:
        torch.multinomial(torch.ones(before, VOCAB), 1, replacement=True)


class Copy:
    """One model and its optimizer, built as the trainer builds them, wrapped when distributed."""

    def __init__(self, case: Case, layout: Layout, batches: list):
        cfg, d = case.cfg, layout.d
        self.cfg, self.layout, self.batches = cfg, layout, batches
        seed_everything(cfg.trainer.seed)  # the same initial weights on every rank and in the references
        self.model = MiniGPT(model_config(cfg.model, VOCAB))
        self.step_model = wrap(self.model, d, CPU, cfg.distributed)  # FSDP shards in place
        self.optimizer = build_optimizer(self.model, cfg.optimizer, BuildContext(CPU, BATCH, BATCH * SEQ, 0))
        self.n_micro = len(layout.micro_batches(batches[0]))
        self.coming = 0  # the index of the coming step's batch, which Sophia's Hessian refresh peeks at
        upcoming = lambda n: layout.micro_batches(batches[self.coming])
        hook_ctx = HookContext(upcoming, contextlib.nullcontext(), self.n_micro, cfg.trainer.grad_clip)
        self.hook = build_hook(self.step_model, self.optimizer, cfg.optimizer, hook_ctx)
        self.scaler = grad_scaler(cfg.trainer.precision, CPU)

    def step(self, i: int) -> torch.Tensor:
        """Optimizer step i (0-based) with the loop's train_step, then the optimizer's hook; the global loss."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        t = self.cfg.trainer
        sc = StepContext(self.step_model, self.optimizer, self.scaler, params, contextlib.nullcontext(), self.n_micro,
                         t.grad_clip, t.grad_clip_value)  # fmt: skip
        loss, _ = train_step(sc, self.layout.micro_batches(self.batches[i]), i + 1)
        self.coming = i + 1
        if self.hook is not None:
            align_sampling_rng(i, self.layout.d)
            self.hook(i + 1)
        return mean_over_ranks(loss, self.layout.d)

    @torch.no_grad()
    def evaluate(self) -> torch.Tensor:
        """The loss on the eval batch at the weights the trainer evaluates (schedule-free: its average)."""
        micro_batches = self.layout.micro_batches(self.batches[-1])
        self.step_model.eval()
        with eval_mode(self.optimizer, self.cfg.optimizer):
            loss = sum(self.step_model(*batch)[1] for batch in micro_batches) / len(micro_batches)
        self.step_model.train()
        return mean_over_ranks(loss, self.layout.d)

    def resumed(self, case: Case) -> Copy:
        """A fresh copy loaded from this one's checkpoint state, taken and loaded as the trainer does:
        in eval mode (schedule-free saves its average), FSDP through torch.distributed.checkpoint's
        sharded state dicts, otherwise torch's own state dicts; then `optimizer.train()`."""
        fresh = Copy(case, self.layout, self.batches)
        sharded = self.layout.d.strategy == "fsdp"
        with eval_mode(self.optimizer, self.cfg.optimizer):
            if sharded:
                model_state = get_model_state_dict(self.model)
                optimizer_state = get_optimizer_state_dict(self.model, self.optimizer)
            else:
                model_state, optimizer_state = self.model.state_dict(), self.optimizer.state_dict()
            model_state, optimizer_state = tree_map_only(torch.Tensor, torch.clone, (model_state, optimizer_state))
        if sharded:
            set_model_state_dict(fresh.model, model_state)
            set_optimizer_state_dict(fresh.model, fresh.optimizer, optimizer_state)
        else:
            fresh.model.load_state_dict(model_state)
            fresh.optimizer.load_state_dict(optimizer_state)
        after_load(fresh.optimizer, case.cfg.optimizer)
        fresh.coming = self.coming
        return fresh


def train(case: Case, layout: Layout, batches: list) -> tuple[list[torch.Tensor], MiniGPT]:
    """STEPS steps, with an evaluation and a checkpoint resumed into a fresh copy after EVAL_AFTER of
    them; the global losses (eval loss included) and the final model."""
    copy, losses = Copy(case, layout, batches), []
    for i in range(STEPS):
        losses.append(copy.step(i))
        if i + 1 == EVAL_AFTER:
            losses.append(copy.evaluate())
            copy = copy.resumed(case)
    return losses, copy.model


def full_params(model: MiniGPT) -> dict[str, torch.Tensor]:
    """Whole parameters (FSDP: gathered from the shards, a collective every rank joins)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in model.named_parameters()}


def live(name: str, diff: torch.Tensor) -> torch.Tensor:
    """The difference without the attention's key bias. It cannot change the loss (it adds q.b_k to every
    score of a query's row, and softmax ignores that), so its gradient is pure rounding noise, which
    optimizers that normalise per element (Lion's sign, Adagrad's first step, Sophia's clip) turn into
    full-lr steps in either direction. Comparing it would compare noise."""
    if name.endswith("attn.c_attn.bias"):
        diff = diff.clone()
        n = diff.numel() // 3  # q, k, v
        diff[n : 2 * n] = 0
    return diff


def param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    diffs = {n: live(n, (a[n] - w).abs()).max().item() for n, w in b.items()}
    worst = max(diffs, key=diffs.get)
    return diffs[worst], worst


def loss_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(abs(x.item() - y.item()) / abs(y.item()) for x, y in zip(a, b, strict=True))


def compare(case: Case, d: Dist, batches) -> dict | None:
    """Train the distributed copy and, in rank 0, the one-process references; the largest differences."""
    losses, model = train(case, Layout(d), batches)
    weights = full_params(model)
    if not d.is_main:
        return None
    whole_losses, whole = train(case, Layout(Dist()), batches)
    split_losses, split = train(case, Layout(Dist(), split=d.world_size), batches)
    whole, split = full_params(whole), full_params(split)
    param_abs, worst = param_diff(weights, whole)
    return {
        # against one process on the whole batch
        "loss_rel": loss_diff(losses, whole_losses), "param_abs": param_abs, "worst_param": worst,
        # against one process accumulating the ranks' shares: the same sums of the same numbers
        "split_loss_rel": loss_diff(losses, split_losses), "split_param_abs": param_diff(weights, split)[0],
        # one process, whole vs accumulated: what fp32 rounding alone does to this optimizer
        "floor_param_abs": param_diff(split, whole)[0], "floor_loss_rel": loss_diff(split_losses, whole_losses),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("strategy", choices=("ddp", "fsdp"))
    parser.add_argument("--only", nargs="*", help="optimizer names (default: all, and adamw+lookahead)")
    parser.add_argument("--run-refused", action="store_true", help="measure those refused at start-up too")
    parser.add_argument("--set", nargs="*", default=[], help="KEY=VALUE overrides of every case (optimizer.fused=true)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    d = setup(args.strategy, "gloo", 120, CPU)
    batches = global_batches()
    names = args.only or [*sorted(load_all()), LOOKAHEAD]
    for name in names:
        start = time.perf_counter()
        case = make_case(name, args.strategy, args.set)
        try:
            result = {} if case.refused and not args.run_refused else compare(case, d, batches)
        except Exception as e:  # a failure is a result too (every rank fails alike, so nobody hangs)
            result = {"error": f"{type(e).__name__}: {e}"[:500]}
        dist.barrier()
        if d.is_main:
            seconds = round(time.perf_counter() - start, 2)
            record = {"strategy": args.strategy, "optimizer": name, **result, "refused": case.refused, "s": seconds}
            print(json.dumps(record), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
