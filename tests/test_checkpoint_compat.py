"""Checkpoints written before the redesign still resume exactly, and a state format this code does not
know is refused in one line. The fixture (tests/fixtures/ckpt_v1/README.md says how it was made) is the
step-4 checkpoint of an 8-step run of commit e0756f3, with that run's whole metrics.jsonl."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg

from trainer import checkpoint as ckpt_io
from trainer.entry.run import run
from trainer.errors import ConfigError

FIXTURE = Path(__file__).parent / "fixtures" / "ckpt_v1"
OVERRIDES = {  # the fixture's command line (its README), with this machine's paths
    "data": "text", "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
    "trainer.micro_batch_size": 4, "trainer.max_steps": 8, "trainer.eval_interval": 4, "trainer.eval_steps": 2,
    "trainer.log_interval": 1, "trainer.ckpt_interval": 4, "trainer.keep_checkpoints": 2,
    "trainer.precision": "fp32", "trainer.progress": "false", "trainer.sample_tokens": 0, "trainer.device": "cpu",
    "schedule.warmup_steps": 2, "logger.wandb.mode": "disabled",
}  # fmt: skip


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_pre_redesign_checkpoint_resumes_as_its_run_continued(tmp_path):
    corpus = tmp_path / "corpus.txt"
    shutil.copy(FIXTURE / "corpus.txt", corpus)
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE / "step_00000004", run_dir / "checkpoints" / "step_00000004")
    full = records(FIXTURE / "uninterrupted_metrics.jsonl")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full if r["step"] <= 4))
    overrides = {**OVERRIDES, "data.path": corpus, "data.cache_dir": tmp_path / "cache", "trainer.resume": "auto"}
    run(compose_cfg([f"{k}={v}" for k, v in overrides.items()]), run_dir)
    resumed = records(run_dir / "metrics.jsonl")
    for key in ("train/loss", "grad_norm", "lr", "val/loss"):
        want = {r["step"]: r[key] for r in full if key in r and r["step"] > 4}
        got = {r["step"]: r[key] for r in resumed if key in r and r["step"] > 4}
        assert set(got) == set(want) and want, key
        assert got == pytest.approx(want, rel=1e-6, abs=0), key


def test_an_unknown_state_format_is_refused_in_one_line(tmp_path):
    ckpt = tmp_path / "step_00000004"
    shutil.copytree(FIXTURE / "step_00000004", ckpt)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["format"] == ckpt_io.STATE_FORMAT
    torch.save({**state, "format": 99}, ckpt / "state.pt")
    with pytest.raises(ConfigError) as info:
        ckpt_io.load_state(ckpt)
    message = str(info.value)
    assert "\n" not in message and "state format 99" in message and f"format {ckpt_io.STATE_FORMAT}" in message


def test_load_model_gives_the_checkpoints_weights_in_eval_mode():
    """The one loader that scripts/export.py, sample.py and loss_landscape.py share."""
    from safetensors.torch import load_file

    model = ckpt_io.load_model(FIXTURE / "step_00000004")
    assert not model.training and model.config.n_layer == 2 and model.config.n_embd == 32
    stored = load_file(FIXTURE / "step_00000004" / "model.safetensors")
    ours = model.state_dict()
    # safetensors stores tied tensors once, under either name; the head and the embedding are one tensor.
    assert set(stored) <= set(ours) and set(ours) - set(stored) <= {"wte.weight", "lm_head.weight"}
    assert model.wte.weight is model.lm_head.weight
    assert all(torch.equal(ours[name], tensor) for name, tensor in stored.items())
