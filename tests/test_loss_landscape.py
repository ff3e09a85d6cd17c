"""scripts/loss_landscape.py: filter-normalised directions, the centre loss, PNG/JSON output, bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from conftest import compose_cfg, make_corpus, tiny_overrides

from trainer import checkpoint as ckpt_io
from trainer.entry.run import run

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("loss_landscape", REPO / "scripts" / "loss_landscape.py")
landscape = importlib.util.module_from_spec(spec)
spec.loader.exec_module(landscape)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny trained run (20 steps), shared by the tests of this module."""
    tmp = tmp_path_factory.mktemp("landscape")
    corpus = tmp / "corpus.txt"
    corpus.write_text(make_corpus())
    run(compose_cfg(tiny_overrides(tmp, corpus, {"trainer.sample_tokens": 0})), tmp / "run")
    return tmp / "run"


def test_directions_are_filter_normalised(run_dir):
    model = ckpt_io.load_model(ckpt_io.find_checkpoint(str(run_dir)))
    direction = landscape.random_direction(model, torch.Generator().manual_seed(3))
    params = list(model.parameters())
    assert len(direction) == len(params) and any(p.dim() == 1 for p in params)
    for p, d in zip(params, direction, strict=True):
        assert d.shape == p.shape
        if p.dim() == 1:
            assert torch.equal(d, torch.zeros_like(p))
        else:
            assert not torch.equal(d, torch.zeros_like(p))
            torch.testing.assert_close(d.norm(dim=1), p.detach().norm(dim=1), rtol=1e-6, atol=0)
    other = landscape.random_direction(model, torch.Generator().manual_seed(4))
    assert not torch.equal(direction[0], other[0])  # the seed picks the direction


def test_loss_at_the_centre_is_the_checkpoints_loss(run_dir):
    ckpt = ckpt_io.find_checkpoint(str(run_dir))
    batches = landscape.val_batches(ckpt, 2, torch.device("cpu"))
    assert batches[0][0].shape == (8, 32)  # the run's micro batch and block size
    model = ckpt_io.load_model(ckpt)
    dirs = [landscape.random_direction(model, torch.Generator().manual_seed(s)) for s in (0, 1)]
    alphas = np.linspace(-1, 1, 5)
    line = landscape.loss_grid(model, batches, dirs[:1], alphas, progress=False)
    grid = landscape.loss_grid(model, batches, dirs, alphas, progress=False)
    fresh = ckpt_io.load_model(ckpt)  # never perturbed
    with torch.no_grad():
        direct = torch.stack([fresh(x, y)[1] for x, y in batches]).mean().item()
    assert line.shape == (5,) and grid.shape == (5, 5)
    assert line[2] == pytest.approx(direct, abs=1e-6) and grid[2, 2] == pytest.approx(direct, abs=1e-6)
    assert abs(line[0] - direct) > 1e-3 and abs(grid[0, 4] - direct) > 1e-3  # the directions move the loss
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):  # weights restored
        assert torch.equal(p, q)


@pytest.mark.parametrize("dims", [1, 2])
def test_end_to_end_writes_png_and_json(run_dir, tmp_path, dims, capsys):
    landscape.main([str(run_dir), "--dims", str(dims), "--points", "5", "--batches", "1"])
    ckpt = ckpt_io.find_checkpoint(str(run_dir))
    png = ckpt / f"landscape_{dims}d.png"
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0
    numbers = json.loads(png.with_suffix(".json").read_text())
    assert numbers["alphas"] == pytest.approx([-1, -0.5, 0, 0.5, 1])
    losses = np.array(numbers["losses"])
    assert losses.shape == (5,) * dims and np.isfinite(losses).all()
    assert losses[(2,) * dims] == pytest.approx(numbers["center_loss"], abs=1e-6)
    assert "wrote" in capsys.readouterr().out
    out = tmp_path / "sub" / "l.png"  # --out
    landscape.main([str(run_dir), "--dims", str(dims), "--points", "3", "--batches", "1", "--out", str(out)])
    assert matplotlib.image.imread(out).ndim == 3 and out.with_suffix(".json").exists()


@pytest.mark.parametrize(
    "args", [["--dims", "3"], ["--points", "2"], ["--dims", "0"]], ids=["dims3", "points2", "dims0"]
)
def test_bad_input_is_one_error_line(run_dir, tmp_path, args, capsys):
    with pytest.raises(SystemExit) as e:
        landscape.main([str(run_dir), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_no_checkpoint_there(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        landscape.main([str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no checkpoint" in err[0]
