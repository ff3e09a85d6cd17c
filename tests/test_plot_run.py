"""scripts/plot_run.py: PNGs from a synthetic metrics.jsonl."""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "plot_run.py"
spec = importlib.util.spec_from_file_location("plot_run", SCRIPT)
plot_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_run)

LAYERS = ["embedding", "block_00.attn", "block_00.mlp", "block_00.norm", "block_01.attn", "block_01.mlp",
          "block_01.norm", "final.norm", "head"]  # fmt: skip
KINDS = ["attn", "mlp", "norm"]  # per-kind summaries (embedding and head are both a layer and a kind)


def record(step: int, stats: bool, **extra) -> dict:
    r = {"step": step, "tokens": step * 1024, "train/loss": 5 - step / 20, "lr": 1e-3 * min(1, step / 20),
         "grad_norm": 2.0 / (1 + step / 10), "tokens_per_s": 1e4, "grad/clip_coef": 1.0, "grad/clipped_steps": 0,
         "perf/tflops": 0.01, "perf/mem_peak": 0.3, "anomaly/nonfinite": 0, "anomaly/grad_explosion": 0,
         "anomaly/loss_spike": 0, "anomaly/skipped_steps": 0, "anomaly/skipped_total": 0}  # fmt: skip
    if stats:
        for i, name in enumerate(LAYERS + KINDS + [""]):
            suffix = f"/{name}" if name else ""
            r |= {f"grad/norm{suffix}": 0.1, f"param/norm{suffix}": 10.0, f"update/norm{suffix}": 0.01,
                  f"update/ratio_log10{suffix}": -3 + 0.1 * i - step / 100}  # fmt: skip
        r["update/ratio_log10/by_layer"] = [-3.0, -2.9]
        r |= {"opt/m_norm": 0.5, "opt/sign_agreement": 0.7, "opt/v/min": 1e-20 * step, "opt/v/median": 1e-7,
              "opt/v/max": 0.02}  # fmt: skip
    return r | extra


def write_run(run_dir: Path, stats: bool = True) -> Path:
    """Steps 0..60: val at 0 and 60, a clip event at 30, a skipped (non-finite) step at 40, -inf ratio at 60;
    the first process stopped after step 30 and a resumed one appended 40..60 (duplicate-free, as the trainer
    truncates on resume)."""
    run_dir.mkdir(parents=True)
    first = [{"step": 0, "tokens": 0, "val/loss": 5.5, "val/ppl": 244.7}]
    first += [record(s, stats and s % 20 == 0) for s in (10, 20)]
    first += [record(30, False, **{"grad_norm": 4.0, "grad/clip_coef": 0.25, "grad/clipped_steps": 3})]
    resumed = [record(40, stats, **{"grad_norm": float("inf"), "anomaly/nonfinite": 1, "anomaly/skipped_steps": 1,
                                    "anomaly/skipped_total": 1})]  # fmt: skip
    resumed += [record(50, False), record(60, stats, **{"val/loss": 3.1, "val/ppl": 22.2})]
    if stats:
        resumed[-1]["update/ratio_log10/block_01.norm"] = float("-inf")  # a layer that did not move
    lines = [json.dumps(r) for r in first + resumed]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_writes_the_four_plots(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run")
    assert plot_run.main([str(run_dir)]) == 0
    out = run_dir / "plots"
    expected = {
        "loss_lr.png": (900, 450),
        "grad_norm.png": (900, 450),
        "update_ratio_heatmap.png": (1000, 600),
        "optimizer_state.png": (1050, 500),  # row 1: m_norm, sign_agreement; row 2: v/min, v/median, v/max
    }
    for name, size in expected.items():
        assert (out / name).stat().st_size > 10_000, name
        assert png_size(out / name) == size, name
    assert capsys.readouterr().out.splitlines() == [str(out / name) for name in expected]


def test_out_dir_and_layer_order(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run")
    assert plot_run.main([str(run_dir), "--out", str(tmp_path / "elsewhere" / "p")]) == 0
    assert len(list((tmp_path / "elsewhere" / "p").glob("*.png"))) == 4
    assert not (run_dir / "plots").exists()
    records = plot_run.load(run_dir / "metrics.jsonl")
    assert plot_run.ratio_layers(records) == LAYERS  # kinds, whole model and by_layer are not rows
    shuffled = ["head", "block_10.mlp", "final.norm", "block_02.norm", "block_02.attn", "embedding", "block_10.attn"]
    assert sorted(shuffled, key=plot_run.layer_order) == [
        "embedding", "block_02.attn", "block_02.norm", "block_10.attn", "block_10.mlp", "final.norm", "head",
    ]  # fmt: skip


def test_load_keeps_the_last_record_of_a_step_and_skips_a_torn_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "train/loss": 4}\n{"step": 20, "train/loss": 3}\n{"step": 10, "train/loss": 3.5}\n'
                    '{"step": 30, "train/lo')  # fmt: skip
    records = plot_run.load(path)
    assert [(r["step"], r["train/loss"]) for r in records] == [(10, 3.5), (20, 3)]
    assert "ignored 1 unreadable line" in capsys.readouterr().out


def test_without_stats_keys_writes_the_first_two_and_notes_the_others(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", stats=False)
    assert plot_run.main([str(run_dir)]) == 0
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == ["grad_norm.png", "loss_lr.png"]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("skip update_ratio_heatmap.png: no update/ratio_log10/<layer>")
    assert lines[3].startswith("skip optimizer_state.png: no opt/")


def test_missing_metrics_file_is_one_error_line_and_exit_code_2(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nope")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: {tmp_path / 'nope' / 'metrics.jsonl'} not found"]


def test_empty_metrics_file_is_an_error(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit) as exit_:
        plot_run.main([str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no records" in err[0]
    assert not (tmp_path / "plots").exists()
