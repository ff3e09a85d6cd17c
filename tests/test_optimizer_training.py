"""Every optimizer in the zoo, at its YAML defaults, trains MiniGPT through the real loop, and a
resumed run continues exactly as an uninterrupted one (optimizer state, Lookahead's slow weights,
Sophia's Hessian estimate, 8-bit states and schedule-free iterates all round-trip)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import compose_cfg, tiny_overrides

from optim.builder import load_all
from trainer.entry.run import run

# (name, extra overrides): every registered optimizer, plus Lookahead wrapping two of them
VARIANTS = [(name, {}) for name in sorted(load_all())]
VARIANTS += [("adamw", {"optimizer.lookahead.k": 3}), ("lion", {"optimizer.lookahead.k": 4})]
IDS = [n + ("+lookahead" if e else "") for n, e in VARIANTS]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name, extra", VARIANTS, ids=IDS)
def test_default_hyperparameters_lower_the_nano_loss(name, extra, tmp_path, corpus_file):
    overrides = tiny_overrides(tmp_path, corpus_file, {
        "model": "nano", "model.block_size": 128, "model.n_layer": 4, "model.n_head": 4, "model.n_embd": 128,
        "optimizer": name, "trainer.max_steps": 40, "trainer.micro_batch_size": 4, "trainer.eval_interval": 40,
        "trainer.eval_steps": 4, "trainer.ckpt_interval": 40, "trainer.sample_tokens": 0, **extra,
    })  # fmt: skip
    run(compose_cfg(overrides), tmp_path / "run")
    val = {r["step"]: r["val/loss"] for r in records(tmp_path / "run") if "val/loss" in r}
    assert val[40] < val[0] - 0.5, val


@pytest.mark.parametrize("name, extra", VARIANTS, ids=IDS)
def test_resume_is_exact(name, extra, tmp_path, corpus_file):
    settings = {"optimizer": name, "trainer.max_steps": 12, "trainer.ckpt_interval": 5, "trainer.log_interval": 1,
                "trainer.eval_interval": 12, "trainer.sample_tokens": 0, "trainer.keep_checkpoints": 3,
                **extra}  # fmt: skip
    if name == "sophia":
        settings["optimizer.hessian_interval"] = 3  # Hessian refreshes before and after the resume point
    overrides = tiny_overrides(tmp_path, corpus_file, settings)
    run(compose_cfg(overrides), tmp_path / "full")
    resumed = tmp_path / "resumed"
    ckpt = "step_00000005"
    shutil.copytree(tmp_path / "full" / "checkpoints" / ckpt, resumed / "checkpoints" / ckpt)
    run(compose_cfg([*overrides, "trainer.resume=auto"]), resumed)
    full = {r["step"]: r for r in records(tmp_path / "full") if r["step"] > 5}
    again = {r["step"]: r for r in records(resumed)}
    assert sorted(again) == sorted(full)
    for step, record in full.items():
        for key in ("train/loss", "grad_norm", "lr"):
            assert again[step][key] == record[key], (step, key)
    assert again[12]["val/loss"] == full[12]["val/loss"]


def test_sophia_hessian_refresh_leaves_the_data_stream_alone(tmp_path, corpus_file):
    """Sophia's estimator reads the coming batch without consuming it: same batches as AdamW."""
    from trainer import checkpoint as ckpt_io

    samplers = {}
    for name in ("adamw", "sophia"):
        extra = {"optimizer": name, "trainer.max_steps": 9, "trainer.sample_tokens": 0}
        if name == "sophia":
            extra["optimizer.hessian_interval"] = 3
        run(compose_cfg(tiny_overrides(tmp_path, corpus_file, extra)), tmp_path / name)
        state = ckpt_io.load_state(ckpt_io.list_checkpoints(tmp_path / name / "checkpoints")[-1])
        samplers[name] = state["sampler"]
    assert samplers["adamw"] == samplers["sophia"] and samplers["adamw"]["consumed"] == 9 * 8
