"""scripts/compare.py: grouping, per-configuration statistics, target, Welch's test and outputs on synthetic runs."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import yaml
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "compare.py"
spec = importlib.util.spec_from_file_location("compare", SCRIPT)
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)

PNG = b"\x89PNG\r\n\x1a\n"
EVAL_STEPS = (0, 100, 200)

# Per configuration and seed: val loss at steps 0, 100, 200, and time/train_s at 100 and 200.
ADAMW = {0: ([5.0, 3.0, 2.0], [10.0, 20.0]), 1: ([5.0, 3.2, 2.2], [11.0, 22.0]), 2: ([5.0, 3.1, 2.1], [12.0, 24.0])}
LION = {0: ([5.0, 2.5, 1.5], [8.0, 16.0]), 1: ([5.0, 2.6, 1.6], [9.0, 18.0]), 2: ([5.0, 2.55, 1.55], [8.0, 17.0])}
SGD = {0: ([5.0, 3.5, 2.05], [10.0, 20.0]), 1: ([5.0, 3.4, 2.15], [10.0, 20.0]), 2: ([5.0, 3.3, math.nan], [10, 20])}
OPTIMIZERS = {"adamw": {"lr": 1e-3, "betas": [0.9, 0.95]}, "lion": {"lr": 1e-4, "betas": [0.9, 0.99]},
              "sgd": {"lr": 0.1, "momentum": 0.9}}  # fmt: skip
TPS = [100.0, 1000.0, 1100.0, 1300.0]  # tokens_per_s at the log steps 50, 100, 150, 200 (+ seed * 10)
MEM = {"adamw": 2.0, "lion": 1.0, "sgd": 1.5}


def config(opt: str, seed: int, max_steps: int = 200, **opt_extra) -> dict:
    return {"model": {"n_layer": 2, "d_model": 64}, "optimizer": {"name": opt} | OPTIMIZERS.get(opt, {}) | opt_extra,
            "schedule": {"name": "cosine", "warmup_steps": 10}, "data": {"cache_dir": f"/tmp/cache{seed}"},
            "trainer": {"seed": seed, "max_steps": max_steps, "eval_interval": 100, "progress": seed % 2 == 0},
            "logger": {"wandb": {"name": f"{opt}-seed{seed}", "group": "g"}}}  # fmt: skip


def records(vals: list[float], times: list[float], seed: int, mem: float | None = 2.0, skipped: int | None = 0):
    """Step 0 eval, log records at 50..200 with evals at 100 and 200; keys set to None are left out."""
    out = [{"step": 0, "tokens": 0, "val/loss": vals[0]}]
    for i, step in enumerate((50, 100, 150, 200)):
        t = [times[0] / 2, times[0], (times[0] + times[1]) / 2, times[1]][i]
        r = {"step": step, "train/loss": 4.0, "tokens_per_s": TPS[i] + seed * 10, "time/train_s": t,
             "memory/optimizer_state_mb": mem, "anomaly/skipped_total": skipped}  # fmt: skip
        if step in EVAL_STEPS:
            r["val/loss"] = vals[EVAL_STEPS.index(step)]
        out.append({k: v for k, v in r.items() if v is not None})
    return out


def write_run(d: Path, cfg: dict, recs: list[dict] | None) -> Path:
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    if recs is not None:
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A Hydra-like sweep: 0/ .. 11/ plus .hydra/ (skipped); adamw seed 0 has a resumed (repeated) step 200."""
    root, i = tmp_path / "sweep", 0
    for opt, seeds in (("adamw", ADAMW), ("lion", LION), ("sgd", SGD)):
        for seed, (vals, times) in seeds.items():
            recs = records(vals, times, seed, mem=MEM[opt], skipped=seed)
            if opt == "adamw" and seed == 0:  # the first process logged step 200 and 150 again after a resume
                recs = recs[:-1] + [recs[-1] | {"val/loss": 9.0}, recs[-2], recs[-1]]
            write_run(root / str(i), config(opt, seed), recs)
            i += 1
    write_run(root / str(i), config("adamw", 3), [])  # failed: empty metrics.jsonl
    write_run(root / str(i + 1), config("lion", 3), None)  # failed: no metrics.jsonl
    write_run(root / ".hydra", config("adamw", 9), records(*ADAMW[0], 9))  # hidden: not a run
    write_run(root / "0" / "checkpoints" / "step_100", config("adamw", 8), records(*ADAMW[0], 8))  # not a run
    return root


def interp(vals: list[float], times: list[float], target: float) -> tuple[float, float] | None:
    """By the docstring's formula, from the eval before the first one at or below target."""
    t = [0.0, *times]
    for i, loss in enumerate(vals):
        if loss <= target:
            if i == 0:
                return 0.0, 0.0
            f = (vals[i - 1] - target) / (vals[i - 1] - loss)
            return EVAL_STEPS[i - 1] + f * 100, t[i - 1] + f * (t[i] - t[i - 1])
    return None


def welch_by_hand(a: list[float], b: list[float]) -> tuple[float, float, float]:
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t, df, 2 * stats.t.sf(abs(t), df)


def run_main(args: list, capsys) -> tuple[int, str, str]:
    try:
        rc = compare.main([str(a) for a in args])
    except SystemExit as e:  # bad input: trainer.errors.exit_with_error
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def by_label(doc: dict) -> dict:
    return {c["label"]: c for c in doc["configurations"]}


def test_sweep_statistics_and_outputs(sweep: Path, capsys) -> None:
    rc, out, err = run_main([sweep], capsys)
    assert rc == 0, err
    doc = json.loads((sweep / "compare.json").read_text())  # OUT defaults to the single directory argument
    assert doc["runs"] == 11 and doc["failed_runs"] == 2 and doc["alpha"] == 0.05
    confs = by_label(doc)
    assert list(confs) == ["optimizer=adamw", "optimizer=lion", "optimizer=sgd"]  # baseline first, then by loss
    adamw, lion, sgd = confs["optimizer=adamw"], confs["optimizer=lion"], confs["optimizer=sgd"]
    assert doc["baseline"] == "optimizer=adamw" and adamw["baseline"] and adamw["verdict"] == "baseline"
    assert (adamw["n"], adamw["failed"], lion["n"], lion["failed"], sgd["n"], sgd["failed"]) == (3, 1, 3, 1, 3, 0)
    assert [s["seed"] for s in adamw["seeds"]] == [0, 1, 2]

    # Target: every adamw seed reaches the worst of their best losses.
    target = max(min(vals) for vals, _ in ADAMW.values())
    assert doc["target"] == pytest.approx(target) and doc["target_rule"].startswith("max over baseline seeds")

    for conf, seeds in ((adamw, ADAMW), (lion, LION)):
        finals = [vals[-1] for vals, _ in seeds.values()]
        bests = [min(vals) for vals, _ in seeds.values()]
        assert conf["final_val_loss"]["mean"] == pytest.approx(sum(finals) / 3)
        assert conf["final_val_loss"]["std"] == pytest.approx(
            math.sqrt(sum((x - sum(finals) / 3) ** 2 for x in finals) / 2)
        )
        assert conf["best_val_loss"]["mean"] == pytest.approx(sum(bests) / 3)
        assert conf["best_val_loss"]["std"] == pytest.approx(statistics.stdev(bests))
        hit = [interp(vals, times, target) for vals, times in seeds.values()]
        assert [s["steps_to_target"] for s in conf["seeds"]] == pytest.approx([h[0] for h in hit])
        assert [s["time_to_target"] for s in conf["seeds"]] == pytest.approx([h[1] for h in hit])
        assert conf["steps_to_target"]["mean"] == pytest.approx(statistics.fmean(h[0] for h in hit))
        assert conf["steps_to_target"]["std"] == pytest.approx(statistics.stdev(h[0] for h in hit))
        assert conf["time_to_target"]["mean"] == pytest.approx(statistics.fmean(h[1] for h in hit))
        assert conf["reached"] == 3 and conf["diverged"] == 0
        assert conf["skipped_steps"] == 0 + 1 + 2
        medians = [statistics.median(x + seed * 10 for x in TPS[1:]) for seed in range(3)]
        assert conf["tokens_per_s"] == pytest.approx(statistics.fmean(medians))
    # hand-checked: adamw seed 0 crosses 2.2 at 100 + (3.0 - 2.2) / (3.0 - 2.0) * 100 = 180 steps, 18 s
    assert adamw["seeds"][0]["steps_to_target"] == pytest.approx(180.0)
    assert adamw["seeds"][0]["time_to_target"] == pytest.approx(18.0)
    assert adamw["seeds"][0]["final_val_loss"] == 2.0  # the repeated step's later record won
    assert adamw["optimizer_state_mb"] == 2.0 and lion["optimizer_state_mb"] == 1.0

    # Welch: lion clearly better; sgd within seed noise.
    a_final = [vals[-1] for vals, _ in ADAMW.values()]
    for conf, seeds, want in ((lion, LION, "better"), (sgd, SGD, "no sig. diff.")):
        finals = [vals[-1] for vals, _ in seeds.values() if math.isfinite(vals[-1])]
        t, df, p = welch_by_hand(finals, a_final)
        got = conf["vs_baseline"]["final_val_loss"]
        assert got["diff"] == pytest.approx(statistics.fmean(finals) - statistics.fmean(a_final))
        assert (got["t"], got["df"], got["p"]) == pytest.approx((t, df, p))
        assert conf["verdict"] == want and (p < 0.05) == (want == "better")
    # Holm over the two comparisons (lion, sgd): the smaller p doubled, the larger kept at least as large
    p_lion, p_sgd = (c["vs_baseline"]["final_val_loss"]["p"] for c in (lion, sgd))
    lo, hi = sorted((p_lion, p_sgd))
    want = {lo: min(1.0, 2 * lo), hi: max(min(1.0, 2 * lo), hi)}
    got = [c["vs_baseline"]["final_val_loss"]["p_holm"] for c in (lion, sgd)]
    assert got == pytest.approx([want[p_lion], want[p_sgd]])
    sgd_steps = [interp(vals, times, target)[0] for vals, times in list(SGD.values())[:2]]
    t, df, p = welch_by_hand(sgd_steps, [interp(v, t, target)[0] for v, t in ADAMW.values()])
    assert sgd["vs_baseline"]["steps_to_target"]["p"] == pytest.approx(p)

    # sgd seed 2 ends in NaN: diverged, not reached, left out of the final-loss mean
    assert sgd["diverged"] == 1 and sgd["reached"] == 2 and sgd["final_val_loss"]["n"] == 2
    assert sgd["seeds"][2]["final_val_loss"] is None and sgd["seeds"][2]["diverged"]

    # stdout table, Markdown and plots
    assert "target val loss 2.2000 (max over baseline seeds" in out and "no sig. diff." in out
    assert f"wrote {sweep / 'compare.md'}" in out
    md = (sweep / "compare.md").read_text()
    assert "| configuration | seeds | failed | final val loss |" in md and "alpha 0.05" in md
    for label in confs:
        assert f"| {label} |" in md
    assert "| 2/3 |" in md and "better" in md and "baseline optimizer=adamw" in md
    for name in ("val_loss_vs_steps.png", "val_loss_vs_time.png"):
        path = sweep / name
        assert path.read_bytes()[:8] == PNG
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0


def test_not_reached_and_first_eval_below_target(sweep: Path, tmp_path: Path, capsys) -> None:
    target = 2.05  # adamw: only seed 0 (final 2.0) gets there
    rc, out, err = run_main([sweep, "--target", target, "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    doc = json.loads((tmp_path / "o" / "compare.json").read_text())
    adamw = by_label(doc)["optimizer=adamw"]
    assert doc["target"] == target and doc["target_rule"] == "--target"
    assert adamw["reached"] == 1 and [s["steps_to_target"] is None for s in adamw["seeds"]] == [False, True, True]
    assert adamw["steps_to_target"] == {"mean": pytest.approx(interp(*ADAMW[0], target)[0]), "std": None, "n": 1}
    assert by_label(doc)["optimizer=lion"]["vs_baseline"]["steps_to_target"]["p"] is None  # 1 baseline seed
    assert "1/3" in out and "n/a" in out
    rc, _, err = run_main([sweep, "--target", 6.0, "--out", tmp_path / "o"], capsys)  # step 0 is already below
    doc = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert rc == 0 and all(
        s["steps_to_target"] == 0 and s["time_to_target"] == 0 for s in doc["configurations"][0]["seeds"]
    )


def test_lr_sweep_grouping_labels_and_default_baseline(tmp_path: Path, capsys) -> None:
    """Runs that differ only in seed and logger name group together; a different lr is another configuration."""
    root = tmp_path / "lr"
    for i, (lr, seed) in enumerate([(1e-4, 0), (1e-4, 1), (3e-4, 0), (3e-4, 1)]):
        vals, times = LION[seed] if lr == 3e-4 else ADAMW[seed]
        write_run(root / f"run{i}", config("lion", seed, lr=lr), records(vals, times, seed))
    rc, out, err = run_main([root, "--alpha", 0.01], capsys)
    assert rc == 0, err
    doc = json.loads((root / "compare.json").read_text())
    assert [c["label"] for c in doc["configurations"]] == ["optimizer.lr=0.0003", "optimizer.lr=0.0001"]
    assert [c["n"] for c in doc["configurations"]] == [2, 2]
    assert doc["baseline"] == "optimizer.lr=0.0003" and "no adamw configuration" in doc["note"]  # lowest final loss
    assert doc["target"] == max(min(LION[s][0]) for s in (0, 1)) and doc["alpha"] == 0.01
    worse = doc["configurations"][1]
    t, df, p = welch_by_hand([ADAMW[s][0][-1] for s in (0, 1)], [LION[s][0][-1] for s in (0, 1)])
    assert worse["vs_baseline"]["final_val_loss"]["p"] == pytest.approx(p)
    assert worse["verdict"] == ("worse" if p < 0.01 else "no sig. diff.")
    assert "note: no adamw configuration" in out
    rc, _, err = run_main([root, "--baseline", "optimizer.lr=0.0001", "--out", tmp_path / "o"], capsys)
    assert rc == 0 and json.loads((tmp_path / "o" / "compare.json").read_text())["baseline"] == "optimizer.lr=0.0001"


def test_single_configuration_old_run_and_early_stop(tmp_path: Path, capsys) -> None:
    """One configuration is labelled by its optimizer; missing keys give n/a; a run stopped early diverged."""
    a = write_run(tmp_path / "a", config("adamw", 0), [{k: v for k, v in r.items() if k in ("step", "val/loss")}
                                                        for r in records(*ADAMW[0], 0)])  # fmt: skip
    b = write_run(tmp_path / "b", config("adamw", 1), records(*ADAMW[1], 1, skipped=1)[:3])  # stopped at 100 of 200
    rc, out, err = run_main([a, b, "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    (conf,) = json.loads((tmp_path / "o" / "compare.json").read_text())["configurations"]
    assert conf["label"] == "optimizer=adamw" and conf["n"] == 2 and conf["diverged"] == 1
    assert [s["diverged"] for s in conf["seeds"]] == [False, True] and conf["seeds"][0]["tokens_per_s"] is None
    assert conf["seeds"][0]["time_to_target"] is None and conf["seeds"][0]["steps_to_target"] is not None
    assert conf["optimizer_state_mb"] == 2.0 and conf["skipped_steps"] == 1  # from the seed that logged them
    assert "n/a" in out
    assert (tmp_path / "o" / "val_loss_vs_time.png").read_bytes()[:8] == PNG


def test_errors(sweep: Path, tmp_path: Path, capsys) -> None:
    rc, out, err = run_main([sweep, "--baseline", "adam", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert err == "error: --baseline adam matches no configuration; configurations: " \
                  "optimizer=adamw, optimizer=lion, optimizer=sgd\n"  # fmt: skip
    (tmp_path / "empty" / ".hydra").mkdir(parents=True)
    rc, out, err = run_main([tmp_path / "empty"], capsys)
    assert rc == 2 and err.startswith("error: no run directories (with metrics.jsonl and config.yaml) under ")
    assert err.count("\n") == 1
    write_run(tmp_path / "failed" / "0", config("adamw", 0), [])
    rc, out, err = run_main([tmp_path / "failed"], capsys)
    assert rc == 2 and err.startswith("error: no run directories") and "1 failed" in err


def test_cli_subprocess(sweep: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "cli"
    argv = [sys.executable, "scripts/compare.py", str(sweep), "--baseline", "lion", "--out", str(out_dir)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (
        "configuration" in proc.stdout and "verdict" in proc.stdout and f"wrote {out_dir / 'compare.md'}" in proc.stdout
    )
    doc = json.loads((out_dir / "compare.json").read_text())
    assert doc["baseline"] == "optimizer=lion" and by_label(doc)["optimizer=adamw"]["verdict"] == "worse"
    assert doc["target"] == pytest.approx(max(min(vals) for vals, _ in LION.values()))
    assert sorted(p.name for p in out_dir.iterdir()) == ["compare.json", "compare.md", "val_loss_vs_steps.png",
                                                          "val_loss_vs_time.png"]  # fmt: skip


def test_a_configuration_that_diverged_on_a_seed_is_never_called_better():
    clear_win = {"diff": -0.5, "p": 0.001, "n": [3, 3]}
    assert compare.verdict(clear_win, 0.05) == "better"
    assert compare.verdict(clear_win, 0.05, diverged=1) == "unstable (1 diverged)"
    assert compare.verdict({**clear_win, "diff": 0.5}, 0.05, diverged=1) == "worse"
    assert compare.verdict({**clear_win, "p": 0.2}, 0.05) == "no sig. diff."


def test_holm_turns_three_raw_p_values_below_alpha_into_no_significant_difference(tmp_path: Path, capsys) -> None:
    """Three configurations each a little better than adamw with raw p ~ 0.04: uncorrected, all three would be
    `better`; Holm multiplies the smallest by 3, so none is."""
    root = tmp_path / "three"
    better = [1.75, 1.85, 1.95]
    finals = {"adamw": [2.0, 2.1, 2.2], "lion": better, "sgd": better, "adam": better}
    for opt, values in finals.items():
        for seed, final in enumerate(values):
            write_run(root / f"{opt}{seed}", config(opt, seed), records([5.0, 3.0, final], [10.0, 20.0], seed))
    rc, out, err = run_main([root], capsys)
    assert rc == 0, err
    doc = json.loads((root / "compare.json").read_text())
    others = [c for c in doc["configurations"] if not c["baseline"]]
    raw = [c["vs_baseline"]["final_val_loss"]["p"] for c in others]
    assert len(others) == 3 and all(0.01 < p < 0.05 for p in raw)
    assert [c["vs_baseline"]["final_val_loss"]["p_holm"] for c in others] == pytest.approx([min(1, 3 * raw[0])] * 3)
    assert [c["verdict"] for c in others] == ["no sig. diff."] * 3
    assert "Holm-corrected over 3 comparison(s)" in out and "Holm 0.1" in (root / "compare.md").read_text()
