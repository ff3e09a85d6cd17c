"""trainer.precision=auto (trainer/runtime.py): the GPU rule, the CPU probe and its cache, forced precisions, and
the autocast context the run gets. Device queries and the probe are patched, so every branch runs on this CPU."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import compose_cfg, tiny_overrides

from models.minigpt import GPTConfig, MiniGPT
from trainer import runtime
from trainer.build import setup_run
from trainer.config import Precision, to_typed
from trainer.errors import ConfigError
from trainer.loop import optimizer_step, step_context
from trainer.runtime import CANDIDATES, Autocast, Numerics, measured_step, probe_seconds, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def never(candidates):
    raise AssertionError("the probe ran where the rule decides")


def probe_says(**ratios):
    """A probe whose candidates take these multiples of fp32's time ('bf16', 'math')."""
    calls = []

    def measure(candidates):
        calls.append(candidates)
        seconds = {"fp32": 1.0, "bf16": ratios.get("bf16", 1.5), "bf16+math-attention": ratios.get("math", 1.5)}
        return {c.name: seconds[c.name] for c in candidates}, False

    measure.calls = calls
    return measure


def test_a_gpu_with_bf16_gets_bf16_and_an_older_one_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    n = resolve_precision(Precision.auto, CUDA, never)
    assert n == Numerics(Precision.bf16, why=n.why) and "has bf16" in n.why
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    n = resolve_precision(Precision.auto, CUDA, never)
    assert n.precision == Precision.fp16 and not n.math_attention and "loss scaling" in n.why
    assert runtime.grad_scaler(n.precision, CPU).is_enabled()  # fp16 scales its loss (checked on the CPU scaler)


def test_a_cpu_without_native_bf16_gets_fp32_without_probing(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    n = resolve_precision(Precision.auto, CPU, never)
    assert n.precision == Precision.fp32 and "no native bf16" in n.why


def test_a_bf16_cpu_takes_the_probes_fastest_candidate(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    measure = probe_says(bf16=1.3, math=0.8)
    n = resolve_precision(Precision.auto, CPU, measure, "cache/x")
    assert (n.precision, n.math_attention) == (Precision.bf16, True)
    assert measure.calls == [CANDIDATES]
    assert "bf16+math-attention took 0.80x fp32" in n.why and "cache/x" in n.why
    n = resolve_precision(Precision.auto, CPU, probe_says(bf16=0.5, math=0.8))
    assert (n.precision, n.math_attention) == (Precision.bf16, False)


def test_fp32_stays_unless_bf16_wins_by_the_margin(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    n = resolve_precision(Precision.auto, CPU, probe_says(bf16=0.97, math=1.2))
    assert n.precision == Precision.fp32 and "0.97x" in n.why
    n = resolve_precision(Precision.auto, CPU, probe_says(bf16=runtime.PROBE_MARGIN, math=1.2))
    assert n.precision == Precision.bf16


@pytest.mark.parametrize("forced", [Precision.bf16, Precision.fp16, Precision.fp32])
def test_a_forced_precision_is_used_as_it_is(monkeypatch, forced):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    n = resolve_precision(forced, CPU, never)
    assert n == Numerics(forced, why=f"trainer.precision={forced.value}")


def test_forced_bf16_on_a_gpu_without_it_fails_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ConfigError, match="not supported by this GPU; use trainer.precision=fp16 or auto"):
        resolve_precision(Precision.bf16, CUDA, never)


def test_autocast_sets_the_dtype_and_the_attention_kernel():
    ctx = Autocast(Precision.bf16, CPU, math_attention=True)
    for _ in range(2):  # reused every micro-step
        with ctx:
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
            with ctx:  # re-entrant
                assert torch.is_autocast_enabled("cpu")
            assert not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.is_autocast_enabled("cpu") and torch.backends.cuda.flash_sdp_enabled()
    with Autocast(Precision.fp32, CPU):
        assert not torch.is_autocast_enabled("cpu") and torch.backends.cuda.flash_sdp_enabled()
    with pytest.raises(ValueError, match="resolve"):
        Autocast(Precision.auto, CPU)


def test_the_probe_times_each_candidate_and_leaves_the_model_and_rng_alone():
    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.1))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    seconds = probe_seconds(model, (2, 16), CPU, CANDIDATES, rounds=2)
    assert set(seconds) == {c.name for c in CANDIDATES} and all(0 < s < 5 for s in seconds.values())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads


def test_the_probe_is_cached_per_machine_and_model_shape(tmp_path, monkeypatch):
    calls = []

    def fake_probe(model, batch, device, candidates, rounds=3):
        calls.append(batch)
        return {c.name: 0.1 * (i + 1) for i, c in enumerate(candidates)}

    monkeypatch.setattr(runtime, "probe_seconds", fake_probe)
    cache = tmp_path / "probe.json"
    model = MiniGPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    first, cached = measured_step(model, CPU, (4, 16), cache, CANDIDATES)
    assert not cached and first == {"fp32": 0.1, "bf16": 0.2, "bf16+math-attention": pytest.approx(0.3)}
    again, cached = measured_step(model, CPU, (4, 16), cache, CANDIDATES)
    assert cached and again == first and calls == [(4, 16)]
    measured_step(model, CPU, (2, 16), cache, CANDIDATES)  # another batch: measured again
    other = MiniGPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16))
    measured_step(other, CPU, (4, 16), cache, CANDIDATES)  # another shape: measured again
    assert calls == [(4, 16), (2, 16), (4, 16)]
    entries = json.loads(cache.read_text())
    assert len(entries) == 3 and {e["machine"] for e in entries.values()} == {runtime.machine_name(CPU)}


def test_an_auto_run_says_what_it_chose_and_why_and_trains_in_it(tmp_path, corpus_file, monkeypatch, caplog):
    """The default precision: the probe (patched) picks bf16 with math attention; the start-up line says so,
    the step context and the evaluation use it, and the probe's results are cached in the data cache."""
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(runtime, "probe_seconds", lambda m, b, d, cands, rounds=3: {
        "fp32": 1.0, "bf16": 1.3, "bf16+math-attention": 0.7})  # fmt: skip
    cfg = to_typed(compose_cfg(tiny_overrides(tmp_path, corpus_file, {"trainer.precision": "auto"})))
    with caplog.at_level(logging.INFO, logger="trainer.build"):
        run = setup_run(cfg, tmp_path / "run")
    assert run.numerics.name == "bf16+math-attention"
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("precision:"))
    assert line.startswith("precision: bf16+math-attention (auto: bf16+math-attention took 0.70x fp32's")
    assert (tmp_path / "cache" / "torch" / "probe.json").exists()
    sc = step_context(run)
    assert sc.autocast.precision == Precision.bf16 and sc.autocast.math_attention
    loss, _ = optimizer_step(run, sc, 1)
    assert torch.isfinite(loss)


def test_auto_resolved_to_fp32_trains_exactly_as_forced_fp32(tmp_path, corpus_file, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    losses = {}
    for precision in ("auto", "fp32"):
        cfg = to_typed(compose_cfg(tiny_overrides(tmp_path, corpus_file, {"trainer.precision": precision})))
        run = setup_run(cfg, tmp_path / precision)
        assert run.numerics.precision == Precision.fp32
        sc = step_context(run)
        losses[precision] = [optimizer_step(run, sc, i + 1)[0].item() for i in range(3)]
    assert losses["auto"] == losses["fp32"]
