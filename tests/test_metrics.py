"""W&B mode resolution and the metrics.jsonl writer."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.config import WandbConfig, WandbMode
from trainer.telemetry.metrics import MetricsLogger, resolve_wandb_mode


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_explicit_modes_are_kept(no_credentials):
    for mode in ("online", "offline", "disabled"):
        assert resolve_wandb_mode(WandbMode(mode)) == mode


def test_auto_is_offline_when_not_logged_in(no_credentials):
    assert resolve_wandb_mode(WandbMode.auto) == "offline"


def test_auto_is_online_with_an_api_key_or_netrc_entry(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode(WandbMode.auto) == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    netrc = no_credentials / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    netrc.chmod(0o600)
    assert resolve_wandb_mode(WandbMode.auto) == "online"


def test_auto_follows_wandb_mode_env(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode(WandbMode.auto) == "disabled"


def test_jsonl_records_and_resume_truncation(tmp_path):
    cfg = WandbConfig(mode=WandbMode.disabled)
    logger = MetricsLogger(tmp_path, cfg, {})
    for step in (10, 20, 30):
        logger.log(step, {"train/loss": step / 10})
    logger.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": s, "train/loss": s / 10} for s in (10, 20, 30)]
    MetricsLogger(tmp_path, cfg, {}, resume_step=20).close()  # resuming at 20 re-does step 30
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [10, 20]


LEGACY = {"step", "tokens", "train/loss", "lr", "grad_norm", "tokens_per_s"}  # named by the spine, kept as they are
PREFIXES = ("train/", "val/", "grad/", "param/", "update/", "opt/", "perf/", "anomaly/", "time/", "memory/")


def test_wandb_gets_the_jsonl_keys_grouped_by_prefix(tmp_path, corpus_file, monkeypatch):
    """A real run's records, as W&B receives them (wandb.init replaced by a recorder) and in metrics.jsonl."""
    import wandb
    from conftest import compose_cfg, tiny_overrides

    from trainer.entry.run import run

    logged: dict[int, dict] = {}

    class Recorder:
        summary: dict = {}

        def log(self, record, step):
            logged[step] = record

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kwargs: Recorder())
    extra = {"trainer.max_steps": 10, "trainer.stats_interval": 5, "logger.wandb.mode": "offline", "optimizer": "lion"}
    run(compose_cfg(tiny_overrides(tmp_path, corpus_file, extra)), tmp_path / "run")
    records = {r["step"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
    assert sorted(logged) == sorted(records) == [0, 5, 10]
    for step, record in records.items():
        assert set(logged[step]) == set(record) - {"step"}
        assert all(key in LEGACY or key.startswith(PREFIXES) for key in record), sorted(record)
    stats = records[5]
    for key in ("grad/clip_coef", "perf/tflops", "perf/mem_peak", "anomaly/skipped_steps", "update/ratio_log10",
                "grad/norm/block_00.attn", "param/norm/embedding", "update/ratio_log10/block_01.mlp",
                "opt/sign_agreement"):  # fmt: skip
        assert key in stats, key
    assert isinstance(logged[5]["update/ratio_log10/by_layer"], wandb.Histogram)
    assert len(stats["update/ratio_log10/by_layer"]) == 2 * 3  # 2 blocks x (attn, mlp, norm)


def test_mfu_uses_the_gpus_dense_bf16_peak(monkeypatch):
    from trainer.telemetry import perf

    monkeypatch.setattr(perf.torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(perf.torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    cuda = torch.device("cuda", 0)
    assert perf.peak_tflops(cuda) == 989.0
    record = perf.perf_record(tokens_per_s=1e6, flops_per_token=6 * 124e6, device=cuda, peak=perf.peak_tflops(cuda))
    assert record["perf/tflops"] == pytest.approx(744.0) and record["perf/mfu"] == pytest.approx(744.0 / 989.0)
    assert record["perf/mem_peak"] == 3.0
    monkeypatch.setattr(perf.torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert perf.peak_tflops(cuda) == 756.0  # the PCIe card is not the SXM one
    assert perf.peak_tflops(torch.device("cpu")) is None
    assert perf.peak_tflops(cuda, "fp32") is None and perf.peak_tflops(cuda, "fp16") == 756.0  # no bf16 peak for fp32
    assert "perf/mfu" not in perf.perf_record(1e3, 1e6, torch.device("cpu"), None)
