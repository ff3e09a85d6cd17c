"""trainer.compile=auto (trainer/compile.py): the decision, the ledger that says a shape compiles from the cache,
where compiled code is cached, and the loop keeping the first compiled step's time."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import compose_cfg, tiny_overrides

from trainer import compile as tc
from trainer import runtime
from trainer.build import setup_run
from trainer.config import to_typed
from trainer.errors import ConfigError
from trainer.loop import fit
from trainer.telemetry.metrics import MetricsLogger


def test_forced_choices_are_kept():
    assert tc.decide(True, 1, None, "cpu", "fp32", None) == (True, "trainer.compile=true")
    assert tc.decide(False, 10**9, None, "cuda", "bf16", None) == (False, "trainer.compile=false")


def test_auto_compiles_when_the_saved_time_beats_the_compile_time():
    cold, warm = tc.COMPILE_SECONDS["cpu"]
    saved = tc.STEP_SAVED[("cpu", "bf16")]
    steps_to_win_cold = round(cold / (0.05 * saved)) + 10  # 50 ms steps
    yes, why = tc.decide("auto", steps_to_win_cold, 0.05, "cpu", "bf16", None)
    assert yes and "a first compile" in why and f"{steps_to_win_cold} steps x ~50 ms x 20% saved" in why
    no, why = tc.decide("auto", steps_to_win_cold - 20, 0.05, "cpu", "bf16", None)  # 10 steps short
    assert not no and "<=" in why
    # a shape this machine compiled before loads from the cache: its measured warm time is the cost
    yes, why = tc.decide("auto", 200, 0.05, "cpu", "bf16", {"cold_s": 80.0, "warm_s": 1.5})
    assert yes and "~2 s to compile (from the cache)" in why
    yes, _ = tc.decide("auto", round(warm / (0.05 * saved)) + 10, 0.05, "cpu", "bf16", {"cold_s": 80.0})
    assert yes  # no warm time measured yet: the warm estimate
    no, why = tc.decide("auto", 10**6, None, "cpu", "fp32", None)
    assert not no and "does not speed fp32 up on cpu" in why
    assert not tc.decide("auto", 0, None, "cuda", "bf16", None)[0]  # nothing left to train
    assert tc.needs_step_estimate("auto", "cpu", "bf16") and tc.needs_step_estimate("auto", "cuda", "fp32")
    assert not tc.needs_step_estimate("auto", "cpu", "fp32") and not tc.needs_step_estimate(True, "cpu", "bf16")


def test_evaluation_runs_the_uncompiled_module():
    model = torch.nn.Linear(2, 2)
    assert tc.uncompiled(model) is model and tc.uncompiled(torch.compile(model)) is model


def test_the_ledger_keeps_the_cold_then_the_warm_time(tmp_path):
    ledger = tc.Ledger(tmp_path / "sub" / "compiled.json")
    assert ledger.get("k") is None
    ledger.record("k", 42.0)
    assert ledger.get("k")["cold_s"] == 42.0 and "warm_s" not in ledger.get("k")
    ledger.record("k", 3.0)
    assert (ledger.get("k")["cold_s"], ledger.get("k")["warm_s"]) == (42.0, 3.0)
    assert tc.compile_key(a=1) == tc.compile_key(a=1) != tc.compile_key(a=2)


def test_the_compile_cache_is_the_trainers_unless_the_user_named_one(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unchanged")  # restored after the test
    monkeypatch.setattr(tc, "_USER_CACHE", None)
    path = tc.use_compile_cache(tmp_path / "a" / "inductor")
    assert path == (tmp_path / "a" / "inductor").resolve() and path.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(path)  # what inductor reads
    monkeypatch.setattr(tc, "_USER_CACHE", str(tmp_path / "mine"))
    assert tc.use_compile_cache(tmp_path / "b") == (tmp_path / "mine").resolve()


def test_a_bad_compile_value_fails_in_one_line():
    with pytest.raises(ConfigError, match="trainer.compile='maybe' must be true, false or auto"):
        to_typed(compose_cfg(["trainer.compile=maybe"]))


def test_a_short_default_run_does_not_compile_and_a_run_puts_its_cache_in_the_data_cache(
    tmp_path, corpus_file, monkeypatch
):  # fmt: skip
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unchanged")
    monkeypatch.setattr(tc, "_USER_CACHE", None)
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)  # fp32: compiling saves nothing on a CPU
    cfg = to_typed(compose_cfg(tiny_overrides(tmp_path, corpus_file, {"trainer.compile": "auto"})))
    run = setup_run(cfg, tmp_path / "run")
    assert run.compiled is None and run.step_model is run.model
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "cache" / "torch" / "inductor").resolve())


def test_auto_compiles_a_long_enough_run(tmp_path, corpus_file, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unchanged")
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(runtime, "probe_seconds", lambda m, b, d, cands, rounds=3: {c.name: 1.0 for c in cands})
    monkeypatch.setattr(runtime, "PROBE_MARGIN", 1.01)  # bf16 chosen at a tie: a precision compile helps on CPU
    cfg = to_typed(compose_cfg(tiny_overrides(tmp_path, corpus_file, {"trainer.compile": "auto",
                                                                        "trainer.precision": "auto"})))  # fmt: skip
    run = setup_run(cfg, tmp_path / "run")  # 20 steps of ~1 s x 20% saved = ~4 s < 60 s: not compiled
    assert run.compiled is None
    monkeypatch.setitem(tc.COMPILE_SECONDS, "cpu", (1.0, 0.5))  # a machine that compiles in a second
    run = setup_run(cfg, tmp_path / "run2")
    assert run.compiled is not None and isinstance(run.step_model, torch._dynamo.eval_frame.OptimizedModule)


def test_the_loop_records_the_first_compiled_steps_time(tmp_path, corpus_file):
    """The ledger write without compiling (compiling takes long in a test): a run marked compiled."""
    cfg = to_typed(compose_cfg(tiny_overrides(tmp_path, corpus_file, {"trainer.max_steps": 3})))
    run = setup_run(cfg, tmp_path / "run")
    run.compiled, run.ledger = "some-key", tc.Ledger(tmp_path / "compiled.json")
    (tmp_path / "run").mkdir()
    metrics = MetricsLogger(tmp_path / "run", cfg.logger.wandb, {})
    fit(run, metrics)
    metrics.close()
    entries = json.loads((tmp_path / "compiled.json").read_text())
    assert list(entries) == ["some-key"] and 0 < entries["some-key"]["cold_s"] < 60
