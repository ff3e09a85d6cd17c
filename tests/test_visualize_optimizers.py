"""scripts/visualize_optimizers.py: the PNGs, and paths that come from the trainer's own optimizer builders."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "visualize_optimizers.py"
_spec = importlib.util.spec_from_file_location("visualize_optimizers", SCRIPT)
vis = importlib.util.module_from_spec(_spec)
sys.modules["visualize_optimizers"] = vis  # its dataclass looks its module up there
_spec.loader.exec_module(vis)


def test_writes_one_png_per_surface(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--steps", "50", "--out", str(tmp_path)]
    printed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True, timeout=120).stdout
    assert "skipped sophia" in printed
    for name in ("rosenbrock", "ravine"):
        path = tmp_path / f"{name}.png"
        assert f"wrote {path}" in printed
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 0  # not a blank canvas


def test_sgd_on_the_ravine_is_plain_gradient_descent():
    surface = dataclasses.replace(vis.SURFACES["ravine"], noise=0.0)
    lr, steps = vis.LRS["ravine"]["sgd"], 50
    path = vis.trajectory("sgd", surface, steps)
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    rot = np.array([[c, s], [-s, c]])  # (u, v) = rot @ (x, y)
    hessian = rot.T @ np.diag([1.0, 100.0]) @ rot
    expected = [np.array(surface.start)]
    for _ in range(steps):
        expected.append(expected[-1] - lr * hessian @ expected[-1])
    np.testing.assert_allclose(path, np.stack(expected), rtol=0, atol=1e-6)


def test_adamw_gets_closer_to_the_rosenbrock_minimum():
    path = vis.trajectory("adamw", "rosenbrock", 300)
    minimum = np.array(vis.SURFACES["rosenbrock"].minimum)
    assert np.linalg.norm(path[-1] - minimum) < np.linalg.norm(path[0] - minimum)
