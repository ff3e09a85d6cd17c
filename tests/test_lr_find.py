"""scripts/lr_find.py: the suggestion rule on a known curve, an end-to-end run, and bad input."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_corpus

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "lr_find.py"
spec = importlib.util.spec_from_file_location("lr_find", SCRIPT)
lr_find = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lr_find)


def synthetic_curve(lrs: np.ndarray) -> np.ndarray:
    """Flat at 5, falls by 3 steepest at lr = 1e-3 (a sigmoid in log10 lr), diverges above lr = 1e-1."""
    x = np.log10(lrs)
    return 5 - 3 / (1 + np.exp(-(x + 3) / 0.3)) + 20 * np.clip(x + 1, 0, None) ** 2


def test_suggestion_on_a_known_curve():
    lrs = np.logspace(-7, 1, 200)
    found = lr_find.suggest(lrs, synthetic_curve(lrs))
    assert 3e-4 <= found["steepest_lr"] <= 3e-3
    assert 1e-2 <= found["min_loss_lr"] <= 1e-1  # the bottom of the valley, before the divergence
    assert found["min_loss_lr_div10"] == pytest.approx(found["min_loss_lr"] / 10)


def test_smoothing_is_bias_corrected():
    assert lr_find.smooth([3.0] * 20) == pytest.approx([3.0] * 20)  # no pull towards 0 at the start
    noisy = 2 + np.random.default_rng(0).normal(0, 0.5, 500)
    assert lr_find.smooth(noisy)[100:].std() < noisy.std() / 3


def test_end_to_end_on_a_tiny_model(tmp_path: Path):
    import matplotlib.image

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus())
    out = tmp_path / "out"
    overrides = [
        "data=text", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "model.n_layer=2",
        "model.n_head=2", "model.n_embd=32", "model.block_size=32", "trainer.micro_batch_size=8",
        "trainer.device=cpu", "trainer.precision=fp32",
    ]  # fmt: skip
    start, end = 1e-6, 10.0
    args = [*overrides, "--start", str(start), "--end", str(end), "--steps", "30", "--out", str(out)]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    png = out / "lr_find.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert height > 100 and width > 100
    saved = json.loads((out / "lr_find.json").read_text())
    for summary in (printed, saved):
        assert start <= summary["suggested_lr"] <= end
        assert start <= summary["min_loss_lr_div10"] * 10 <= end
        assert summary["rule"].startswith("steepest")
    assert 10 <= len(saved["lr"]) == len(saved["loss"]) <= 30
    assert saved["lr"][0] == pytest.approx(start)


@pytest.mark.parametrize("args", [["--start", "1", "--end", "1e-3"], ["--start", "1e-3", "--end", "1e-3"],
                                  ["--steps", "5"], ["--start", "0"]])  # fmt: skip
def test_bad_input_is_one_error_line(args, capsys):
    with pytest.raises(SystemExit) as exc:
        lr_find.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
