"""Anomaly detection and actions (trainer/telemetry/anomaly.py) on injected NaN losses and loss spikes.

The injection multiplies the training loss of chosen optimizer steps by NaN or by a large factor (the
gradient scales with it, so a spike is also a gradient explosion), through a wrapper around the
model's forward that counts training steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, tiny_overrides

from models.minigpt import GPTConfig, MiniGPT
from trainer import checkpoint as ckpt_io
from trainer.config import AnomalyConfig
from trainer.entry.run import run
from trainer.loop import StepContext, train_step
from trainer.telemetry.anomaly import AnomalyGuard


@pytest.fixture
def inject(monkeypatch):
    """inject({step: factor}): scale the training loss of those optimizer steps (1-based; accum 1)."""

    def install(factors: dict[int, float]):
        forward = MiniGPT.forward
        calls = {"n": 0}

        def scaled(self, idx, targets=None):
            logits, loss = forward(self, idx, targets)
            if self.training and loss is not None:
                calls["n"] += 1
                loss = loss * factors.get(calls["n"], 1.0)
            return logits, loss

        monkeypatch.setattr(MiniGPT, "forward", scaled)

    return install


def train(tmp_path: Path, corpus: Path, extra: dict) -> list[dict]:
    base = {"trainer.max_steps": 40, "trainer.log_interval": 1, "trainer.eval_interval": 40, "trainer.sample_tokens": 0,
            "trainer.ckpt_interval": 100, "trainer.stats_interval": 0, "trainer.anomaly.window": 8}  # fmt: skip
    run(compose_cfg(tiny_overrides(tmp_path, corpus, {**base, **extra})), tmp_path / "run")
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def at(records: list[dict], step: int) -> dict:
    return next(r for r in records if r["step"] == step and "train/loss" in r)


def test_nonfinite_steps_are_skipped_by_default(tmp_path, corpus_file, inject):
    inject({30: float("nan")})
    records = train(tmp_path, corpus_file, {})
    assert at(records, 30)["anomaly/nonfinite"] == 1 and at(records, 30)["anomaly/skipped_steps"] == 1
    assert at(records, 40)["anomaly/skipped_total"] == 1 and math.isfinite(at(records, 40)["train/loss"])
    assert math.isnan(at(records, 30)["grad_norm"])
    weights = ckpt_io.load_state(ckpt_io.list_checkpoints(tmp_path / "run" / "checkpoints")[-1])
    assert weights["anomaly"]["skipped_total"] == 1


def test_nonfinite_warn_applies_the_step(tmp_path, corpus_file, inject, caplog):
    inject({30: float("nan")})
    records = train(tmp_path, corpus_file, {"trainer.anomaly.nonfinite": "warn"})
    assert at(records, 30)["anomaly/nonfinite"] == 1 and at(records, 30)["anomaly/skipped_steps"] == 0
    assert math.isnan(at(records, 31)["train/loss"])  # the NaN step was applied: the weights are NaN now
    assert "nonfinite at 1 step(s)" in caplog.text


def test_nonfinite_stop_checkpoints_the_weights_before_it_and_exits(tmp_path, corpus_file, inject, capsys):
    inject({30: float("nan")})
    with pytest.raises(SystemExit) as exit_info:
        train(tmp_path, corpus_file, {"trainer.anomaly.nonfinite": "stop"})
    assert exit_info.value.code == 3
    assert "stopped by trainer.anomaly: nonfinite at step 30" in capsys.readouterr().err
    (ckpt,) = ckpt_io.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert ckpt_io.load_state(ckpt)["step"] == 30
    model = MiniGPT(GPTConfig(**ckpt_io.load_state(ckpt)["model_config"]))
    ckpt_io.load_weights(model, ckpt)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_consecutive_skips_stop_the_run(tmp_path, corpus_file, inject, capsys):
    inject({s: float("nan") for s in range(20, 41)})
    with pytest.raises(SystemExit) as exit_info:
        train(tmp_path, corpus_file, {"trainer.anomaly.max_consecutive_skips": 3})
    assert exit_info.value.code == 3
    assert "3 steps skipped in a row" in capsys.readouterr().err
    assert ckpt_io.load_state(ckpt_io.list_checkpoints(tmp_path / "run" / "checkpoints")[-1])["step"] == 22


def test_loss_spike_and_grad_explosion_are_detected_with_their_actions(tmp_path, corpus_file, inject):
    inject({30: 100.0})
    records = train(tmp_path, corpus_file, {"trainer.anomaly.loss_spike": "skip"})
    r = at(records, 30)
    assert r["anomaly/loss_spike"] == 1 and r["anomaly/grad_explosion"] == 1 and r["anomaly/skipped_steps"] == 1
    assert all(at(records, s)["anomaly/loss_spike"] == 0 for s in range(2, 30))  # no false alarms before


def test_grad_explosion_stop(tmp_path, corpus_file, inject, capsys):
    inject({30: 100.0})
    with pytest.raises(SystemExit):
        train(tmp_path, corpus_file, {"trainer.anomaly.grad_explosion": "stop"})
    assert "grad_explosion" in capsys.readouterr().err


def test_a_skipped_step_leaves_weights_and_optimizer_state_untouched():
    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    guard = AnomalyGuard(AnomalyConfig(), torch.device("cpu"))
    params = list(model.parameters())
    x = torch.randint(0, 64, (2, 16))

    def step(scale: float):
        batches = [(x, x)]
        model.forward, forward = (lambda i, t=None: (None, MiniGPT.forward(model, i, t)[1] * scale)), model.forward
        try:
            sc = StepContext(model, optimizer, scaler, params, torch.autocast("cpu", enabled=False), 1, 1.0, 0.0,
                             guard.allow)  # fmt: skip
            train_step(sc, batches, step=1)
        finally:
            model.forward = forward

    step(1.0)
    weights = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in params]
    step(float("nan"))
    assert guard.skipped_total == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, params, strict=True))
    for p, saved in zip(params, state, strict=True):
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in saved.items())
