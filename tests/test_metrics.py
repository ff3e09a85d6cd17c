"""W&B mode resolution and the metrics.jsonl writer."""

from __future__ import annotations

import json

import pytest

from trainer.config import WandbConfig, WandbMode
from trainer.metrics import MetricsLogger, resolve_wandb_mode


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
