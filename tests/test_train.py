"""The training loop in-process: learning, accumulation, clipping, precision, checkpoints, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, tiny_overrides

from models.minigpt import GPTConfig, MiniGPT
from trainer import checkpoint as ckpt_io
from trainer.build import setup_run
from trainer.config import to_typed
from trainer.distributed import Dist
from trainer.entry.run import run
from trainer.errors import ConfigError
from trainer.loop import StepContext, train_step


def train(tmp_path: Path, corpus: Path, run_dir: Path, extra: dict | None = None) -> list[dict]:
    run(compose_cfg(tiny_overrides(tmp_path, corpus, extra)), run_dir)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def by_step(records: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records if key in r}


def test_loss_falls_on_a_small_corpus(tmp_path, corpus_file):
    records = train(tmp_path, corpus_file, tmp_path / "run",
                    {"trainer.max_steps": 80, "trainer.eval_interval": 40, "optimizer.lr": 3e-3})  # fmt: skip
    val = by_step(records, "val/loss")
    assert list(val) == [0, 40, 80]
    assert val[80] < val[0] - 2.0  # from ~ln(256) to well under it
    train_loss = by_step(records, "train/loss")
    assert train_loss[80] < train_loss[5] - 1.5
    for r in records[1:]:
        assert {"step", "tokens", "train/loss", "lr", "grad_norm", "tokens_per_s", "time/train_s"} <= r.keys()
    seconds = list(by_step(records, "time/train_s").values())
    assert seconds == sorted(seconds) and seconds[0] > 0  # cumulative training time, for compare.py's time axis
    # AdamW keeps two fp32 moments per parameter (and a step count per tensor)
    n_params = sum(p.numel() for p in MiniGPT(GPTConfig(**ckpt_io.load_state(
        tmp_path / "run" / "checkpoints" / "step_00000080")["model_config"])).parameters())  # fmt: skip
    assert records[-1]["memory/optimizer_state_mb"] == pytest.approx(8 * n_params / 2**20, rel=0.01)
    assert records[-1]["tokens"] == 80 * 8 * 32
    assert (tmp_path / "run" / "sample.txt").read_text()


def copy_model(seed: int = 0) -> tuple[MiniGPT, MiniGPT]:
    torch.manual_seed(seed)
    a = MiniGPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    b = MiniGPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    b.load_state_dict(a.state_dict())
    return a, b


class GradRecorder(torch.optim.Optimizer):
    """Records the gradients it is given (after clipping) and applies nothing."""

    def __init__(self, params):
        super().__init__(params, {})
        self.seen: list[torch.Tensor] = []

    def step(self, closure=None):
        self.seen = [p.grad.clone() for g in self.param_groups for p in g["params"]]


def run_step(model, batches, grad_clip=0.0, grad_clip_value=0.0):
    params = list(model.parameters())
    opt = GradRecorder(params)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    sc = StepContext(model, opt, scaler, params, torch.autocast("cpu", enabled=False), len(batches), grad_clip,
                     grad_clip_value)  # fmt: skip
    loss, norm = train_step(sc, iter(batches))
    return loss, norm, opt.seen


def test_accumulation_matches_one_big_batch():
    a, b = copy_model()
    x, y = torch.randint(0, 64, (2, 8, 16))
    loss_big, norm_big, grads_big = run_step(a, [(x, y)])
    loss_acc, norm_acc, grads_acc = run_step(b, [(x[:4], y[:4]), (x[4:], y[4:])])
    torch.testing.assert_close(loss_acc, loss_big, rtol=1e-6, atol=0)
    torch.testing.assert_close(norm_acc, norm_big, rtol=1e-5, atol=0)
    for g1, g2 in zip(grads_big, grads_acc, strict=True):
        torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-7)


def test_norm_clipping_bounds_the_norm_and_logs_the_preclip_norm():
    a, b = copy_model()
    x, y = torch.randint(0, 64, (2, 8, 16))
    _, raw_norm, raw = run_step(a, [(x, y)])
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in raw]))
    torch.testing.assert_close(raw_norm, expected)
    clip = float(raw_norm) / 4
    _, logged, clipped = run_step(b, [(x, y)], grad_clip=clip)
    torch.testing.assert_close(logged, raw_norm)  # the logged norm is the pre-clip one
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped]))
    assert after <= clip * (1 + 1e-5)
    for g, r in zip(clipped, raw, strict=True):  # same direction, scaled
        torch.testing.assert_close(g, r * (clip / float(raw_norm)), rtol=1e-4, atol=1e-8)


def test_value_clipping_bounds_every_element():
    a, _ = copy_model()
    x, y = torch.randint(0, 64, (2, 8, 16))
    _, _, grads = run_step(a, [(x, y)], grad_clip_value=1e-3)
    largest = max(float(g.abs().max()) for g in grads)
    assert largest == pytest.approx(1e-3)  # clipping was active and is a bound


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(tmp_path, corpus_file, precision):
    records = train(tmp_path, corpus_file, tmp_path / "run",
                    {"trainer.precision": precision, "trainer.max_steps": 30, "optimizer.lr": 3e-3})  # fmt: skip
    val = by_step(records, "val/loss")
    assert val[30] < val[0] - 0.5


def test_resume_reproduces_the_uninterrupted_run(tmp_path, corpus_file):
    extra = {"trainer.max_steps": 40, "model.dropout": 0.1, "trainer.grad_accum_steps": 2}
    full = train(tmp_path, corpus_file, tmp_path / "full", extra)
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path / "full" / "checkpoints")] == [
        "step_00000030",
        "step_00000040",
    ]  # fmt: skip  (keep_checkpoints=2)
    # A run stopped after step 20: its directory holds the step-20 checkpoint and the records up to 20.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000030", resumed_dir / "checkpoints" / "step_00000030")
    (resumed_dir / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in full if r["step"] <= 35)
    )  # fmt: skip  (later ones get dropped)
    resumed = train(tmp_path, corpus_file, resumed_dir, {**extra, "trainer.resume": "auto"})
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for key in ("train/loss", "grad_norm", "lr", "val/loss"):
        assert by_step(resumed, key) == by_step(full, key), key
    # training time continues from the checkpoint's: the step-30 total plus the resumed run's own time
    at_30 = ckpt_io.load_state(resumed_dir / "checkpoints" / "step_00000030")["train_seconds"]
    resumed_seconds = by_step(resumed, "time/train_s")
    assert at_30 == pytest.approx(by_step(full, "time/train_s")[30], rel=0.5) and resumed_seconds[40] > at_30
    a = ckpt_io.load_state(tmp_path / "full" / "checkpoints" / "step_00000040")
    b = ckpt_io.load_state(resumed_dir / "checkpoints" / "step_00000040")
    assert a["sampler"] == b["sampler"]


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, corpus_file):
    records = train(tmp_path, corpus_file, tmp_path / "run", {"trainer.resume": "auto", "trainer.max_steps": 5})
    assert records[0]["step"] == 0


def test_failed_checkpoint_write_leaves_the_previous_one(tmp_path, corpus_file, monkeypatch):
    train(tmp_path, corpus_file, tmp_path / "run", {"trainer.max_steps": 10})
    root = tmp_path / "run" / "checkpoints"
    before = ckpt_io.list_checkpoints(root)
    assert [p.name for p in before] == ["step_00000010"]

    def crash(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io.torch, "save", crash)
    model = MiniGPT(GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32))
    with pytest.raises(OSError, match="disk full"):
        ckpt_io.save_checkpoint(
            root, 20, lambda tmp: ckpt_io.write_files(tmp, model, {"step": 20}, "cfg", None), Dist(), keep=2
        )
    monkeypatch.undo()
    assert ckpt_io.list_checkpoints(root) == before  # step 20 never appears half-written
    assert sorted(p.name for p in root.iterdir()) == ["step_00000010"]  # temporary directory removed
    assert ckpt_io.choose_resume("auto", tmp_path / "run", Dist())[0] == before[0]
    assert ckpt_io.load_state(before[0])["step"] == 10


def test_checkpoint_contents_load_with_weights_only(tmp_path, corpus_file):
    train(tmp_path, corpus_file, tmp_path / "run", {"trainer.max_steps": 10})
    ckpt = ckpt_io.list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    files = {"model.safetensors", "state.pt", "config.yaml", "tokenizer", "manifest.json"}
    assert {p.name for p in ckpt.iterdir()} == files
    state = ckpt_io.load_state(ckpt)  # weights_only=True inside
    assert {"optimizer", "scheduler", "scaler", "sampler", "rng", "step", "model_config", "tokenizer"} <= state.keys()
    model = MiniGPT(GPTConfig(**state["model_config"]))
    ckpt_io.load_weights(model, ckpt)
    assert model.lm_head.weight is model.wte.weight


@pytest.mark.parametrize(
    "change, message",
    [({"model.n_embd": 64}, "another model shape"), ({"tokenizer": "char"}, "another vocabulary")],
)
def test_resume_refuses_an_incompatible_checkpoint(tmp_path, corpus_file, change, message):
    train(tmp_path, corpus_file, tmp_path / "run", {"trainer.max_steps": 10})
    cfg = to_typed(compose_cfg(tiny_overrides(tmp_path, corpus_file, {"trainer.resume": "auto", **change})))
    with pytest.raises(ConfigError, match=message):
        setup_run(cfg, tmp_path / "run")


def test_compile_trains(tmp_path, corpus_file):
    records = train(tmp_path, corpus_file, tmp_path / "run", {"trainer.compile": "true", "trainer.max_steps": 5})
    assert by_step(records, "train/loss")[5] > 0


def test_sigint_mid_run_checkpoints_and_exits_130(tmp_path, corpus_file):
    """Ctrl-C: the step in flight finishes, a checkpoint is written, the exit status is 128 + SIGINT."""
    extra = {"trainer.max_steps": 100000, "trainer.ckpt_interval": 100000, "trainer.eval_interval": 100000}
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(SystemExit) as info:
            train(tmp_path, corpus_file, tmp_path / "run", extra)
    finally:
        timer.cancel()
    assert info.value.code == 128 + signal.SIGINT
    (ckpt,) = ckpt_io.list_checkpoints(tmp_path / "run" / "checkpoints")
    step = ckpt_io.load_state(ckpt)["step"]
    assert 0 < step < 100000
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_activation_checkpointing_gives_the_same_run(tmp_path, corpus_file):
    plain = train(tmp_path, corpus_file, tmp_path / "plain", {"trainer.max_steps": 10})
    ac = train(
        tmp_path, corpus_file, tmp_path / "ac", {"trainer.max_steps": 10, "trainer.activation_checkpointing": True}
    )
    assert by_step(ac, "train/loss") == by_step(plain, "train/loss")
    assert by_step(ac, "grad_norm") == by_step(plain, "grad_norm")
    # same state-dict keys: a checkpoint written without it resumes with it
    extra = {"trainer.max_steps": 12, "trainer.activation_checkpointing": True, "trainer.resume": "auto"}
    resumed = train(tmp_path, corpus_file, tmp_path / "plain", extra)
    assert resumed[-1]["step"] == 12
