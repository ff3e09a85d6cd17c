"""Fault injection: what a careless user and a hostile cluster do to a run directory. Each case gives one
clear line, or an exact continuation of the run; no data is lost or mixed (issue 14)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, compose_cfg, make_corpus, tiny_overrides

from trainer import checkpoint as ckpt_io
from trainer.config import DataConfig
from trainer.data.corpus import find_corpus
from trainer.entry.run import run

EXTRA = {"trainer.max_steps": 10, "trainer.log_interval": 1, "trainer.eval_interval": 5, "trainer.ckpt_interval": 5,
         "trainer.keep_checkpoints": 3, "trainer.sample_tokens": 0}  # fmt: skip


def train(tmp_path: Path, corpus: Path, run_dir: Path, **extra) -> None:
    run(compose_cfg(tiny_overrides(tmp_path, corpus, {**EXTRA, **extra})), run_dir)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def by_step(rows: list[dict], key: str = "train/loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in rows if key in r}


def copy_until(full: Path, run_dir: Path, step: int) -> None:
    """A run directory as a kill after `step` leaves it: that checkpoint and the records up to it."""
    for ckpt in ckpt_io.list_checkpoints(full / "checkpoints"):
        if int(ckpt.name[5:]) <= step:
            shutil.copytree(ckpt, run_dir / "checkpoints" / ckpt.name)
    rows = [r for r in records(full) if r["step"] <= step]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def full(tmp_path, corpus_file) -> Path:
    """An uninterrupted 10-step run: checkpoints at 5 and 10."""
    train(tmp_path, corpus_file, tmp_path / "full")
    return tmp_path / "full"


def test_a_second_launch_into_a_used_run_directory_is_refused_in_one_line(tmp_path, corpus_file, full):
    before = (full / "metrics.jsonl").read_text()
    overrides = tiny_overrides(tmp_path, corpus_file, {**EXTRA, "optimizer.lr": 3e-3})
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={full}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {full} already holds a run: pass trainer.resume=auto to continue it, a new hydra.run.dir, or "
        "trainer.start_over=true to archive it and start again"
    ]
    assert (full / "metrics.jsonl").read_text() == before  # untouched
    with pytest.raises(SystemExit) as info:  # the run itself refuses too (under torchrun, precheck leaves it to it)
        train(tmp_path, corpus_file, full, **{"optimizer.lr": 3e-3})
    assert info.value.code == 2 and (full / "metrics.jsonl").read_text() == before


def test_start_over_archives_the_old_run_and_trains_again(tmp_path, corpus_file, full, caplog):
    before = (full / "metrics.jsonl").read_text()
    with caplog.at_level(logging.WARNING):
        train(tmp_path, corpus_file, full, **{"trainer.start_over": "true", "optimizer.lr": 3e-3})
    (archive,) = full.glob("replaced-*")
    assert (archive / "metrics.jsonl").read_text() == before and (archive / "checkpoints" / "step_00000010").is_dir()
    assert f"is now in {archive}" in caplog.text
    steps = [r["step"] for r in records(full)]
    assert steps == sorted(set(steps)) and steps[-1] == 10  # each step once: nothing mixed in
    assert "lr: 0.003" in (full / "checkpoints" / "step_00000010" / "config.yaml").read_text()


def test_start_over_with_resume_is_refused(tmp_path, corpus_file):
    with pytest.raises(SystemExit) as info:
        train(tmp_path, corpus_file, tmp_path / "run", **{"trainer.start_over": "true", "trainer.resume": "auto"})
    assert info.value.code == 2


@pytest.mark.parametrize("damage", ["weights deleted", "state truncated"])
def test_an_incomplete_newest_checkpoint_is_skipped_then_rewritten(tmp_path, corpus_file, full, damage, caplog):
    run_dir = tmp_path / "run"
    copy_until(full, run_dir, 10)
    newest = run_dir / "checkpoints" / "step_00000010"
    if damage == "weights deleted":
        (newest / "model.safetensors").unlink()
    else:
        state = newest / "state.pt"
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    assert [p.name for p in ckpt_io.list_checkpoints(run_dir / "checkpoints")] == ["step_00000005"]
    with caplog.at_level(logging.WARNING):
        train(tmp_path, corpus_file, run_dir, **{"trainer.resume": "auto"})
    assert f"skipping {newest}" in caplog.text and "continuing from" in caplog.text
    assert ckpt_io.is_complete(newest) is None  # written again, in full
    assert (run_dir / "checkpoints" / "step_00000010.replaced").is_dir()  # the damaged one, kept aside
    assert by_step(records(run_dir)) == by_step(records(full))  # the exact continuation


def test_naming_an_incomplete_checkpoint_fails_in_one_line(tmp_path, corpus_file, full):
    ckpt = full / "checkpoints" / "step_00000010"
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(SystemExit) as info:
        train(tmp_path, corpus_file, tmp_path / "other", **{"trainer.resume": str(ckpt)})
    assert info.value.code == 2


def test_a_torn_last_line_of_metrics_is_dropped_and_the_run_resumes(tmp_path, corpus_file, full, caplog):
    """A kill during a write leaves half a line; the resumed run drops it, with a warning."""
    run_dir = tmp_path / "run"
    shutil.copytree(full, run_dir)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "train/lo')
    with caplog.at_level(logging.WARNING):
        train(tmp_path, corpus_file, run_dir, **{"trainer.resume": "auto", "trainer.max_steps": 12})
    assert "dropped 1 line(s) that are not whole records" in caplog.text
    steps = [r["step"] for r in records(run_dir)]  # every line parses
    assert steps == sorted(set(steps)) and steps[-1] == 12


def test_a_changed_lr_on_resume_applies_from_the_first_resumed_step(tmp_path, corpus_file, full, caplog):
    """The command line's optimizer.lr applies on resume, as the schedule's new peak: the lrs logged after
    the resume are those of a run trained with that lr from the start."""
    reference = tmp_path / "reference"
    train(tmp_path, corpus_file, reference, **{"optimizer.lr": 5e-4})
    run_dir = tmp_path / "run"
    copy_until(full, run_dir, 5)
    with caplog.at_level(logging.INFO):
        train(tmp_path, corpus_file, run_dir, **{"optimizer.lr": 5e-4, "trainer.resume": "auto"})
    assert "resume: optimizer.lr 0.001 -> 0.0005" in caplog.text
    got, want = by_step(records(run_dir), "lr"), by_step(records(reference), "lr")
    assert {s: got[s] for s in range(6, 11)} == pytest.approx({s: want[s] for s in range(6, 11)}, rel=1e-12)
    assert by_step(records(full), "lr")[6] == pytest.approx(2 * got[6])  # not the checkpoint's


def test_a_longer_run_on_resume_follows_its_new_schedule_from_the_first_resumed_step(
    tmp_path, corpus_file, full, caplog
):
    """ "Train longer": resuming the finished 10-step run with trainer.max_steps=20 stretches its cosine schedule.
    Every resumed step, the first included, runs at the lr of a 20-step run (LambdaLR alone would run step 11 at
    the checkpoint's lr, the end of the 10-step decay)."""
    reference = tmp_path / "reference"
    train(tmp_path, corpus_file, reference, **{"trainer.max_steps": 20})
    run_dir = tmp_path / "run"
    copy_until(full, run_dir, 10)
    with caplog.at_level(logging.INFO):
        train(tmp_path, corpus_file, run_dir, **{"trainer.max_steps": 20, "trainer.resume": "auto"})
    assert "resume: trainer.max_steps 10 -> 20" in caplog.text
    got, want = by_step(records(run_dir), "lr"), by_step(records(reference), "lr")
    assert {s: got[s] for s in range(11, 21)} == pytest.approx({s: want[s] for s in range(11, 21)}, rel=1e-12)
    assert got[11] > 2 * by_step(records(full), "lr")[10]  # not the 10-step schedule's last lr


def test_resuming_with_another_optimizer_is_refused_in_one_line(tmp_path, corpus_file, full):
    run_dir = tmp_path / "run"
    copy_until(full, run_dir, 5)
    for extra in ({"optimizer": "lion"}, {"optimizer.lookahead.k": 5}):
        with pytest.raises(SystemExit) as info:
            train(tmp_path, corpus_file, run_dir, **{**extra, "trainer.resume": "auto"})
        assert info.value.code == 2


def text_dir(tmp_path: Path) -> Path:
    """A directory as users point data.path at: their text, plus a .git/ of objects and a hidden file."""
    root = tmp_path / "docs"
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "a.txt").write_text(make_corpus(2_000))
    (root / ".git" / "objects" / "ab").mkdir(parents=True)
    (root / ".git" / "objects" / "ab" / "cdef01").write_text("blob 12 not your text")
    (root / ".hidden.txt").write_text("editor state")
    return root


def test_hidden_directories_and_files_are_not_read(tmp_path):
    root = text_dir(tmp_path)
    corpus = find_corpus(DataConfig(kind="text", path=str(root)))
    assert corpus.files == [(root / "notes" / "a.txt").resolve()]  # not .git/objects/..., not .hidden.txt


def test_a_binary_file_is_refused_in_one_line(tmp_path):
    root = text_dir(tmp_path)
    (root / "notes" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), "data=text", f"data.path={root}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "logo.png is not text" in lines[0], proc.stderr
    assert not run_dir.exists()  # before any work


def test_bytes_that_are_not_utf8_are_counted_in_a_warning(tmp_path, caplog):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 cr\u00e8me ".encode("latin-1") + b"and valid text")
    corpus = find_corpus(DataConfig(kind="text", path=str(path)))
    with caplog.at_level(logging.WARNING):
        (text,) = list(corpus.texts())
    assert text == "caf\ufffd cr\ufffdme and valid text"  # replaced as before, now said
    assert "2 bytes in 1 file(s) were not UTF-8" in caplog.text


def garble(path: Path) -> None:
    """Same size, other bytes: a bit-rotted or hand-edited file that a size check cannot tell."""
    path.write_bytes(bytes(b ^ 0x5A for b in path.read_bytes()))


def without_checksums(ckpt: Path) -> None:
    """The manifest as checkpoints written before checksums have it: sizes only."""
    manifest = json.loads((ckpt / ckpt_io.MANIFEST).read_text())
    manifest["files"] = {name: entry["bytes"] for name, entry in manifest["files"].items()}
    (ckpt / ckpt_io.MANIFEST).write_text(json.dumps(manifest))


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("checksums", [True, False], ids=["checksummed", "sizes-only manifest"])
@pytest.mark.parametrize("name", ["state.pt", "model.safetensors"])
def test_resume_auto_falls_back_past_a_garbled_newest_checkpoint(tmp_path, corpus_file, full, name, checksums, caplog):
    """resume=auto skips the damaged newest checkpoint with a warning naming the file, continues exactly from the
    one before, and keeps the damaged one aside when it writes that step again."""
    run_dir = tmp_path / "run"
    copy_until(full, run_dir, 10)
    newest = run_dir / "checkpoints" / "step_00000010"
    if not checksums:
        without_checksums(newest)
    garble(newest / name)
    with caplog.at_level(logging.WARNING):
        train(tmp_path, corpus_file, run_dir, **{"trainer.resume": "auto"})
    assert f"skipping {newest} ({name}" in caplog.text and "continuing from step_00000005" in caplog.text
    assert by_step(records(run_dir)) == by_step(records(full))  # the exact continuation from step 5
    assert (run_dir / "checkpoints" / "step_00000010.replaced").is_dir() and ckpt_io.damage(newest) is None


@pytest.mark.parametrize("name", ["state.pt", "model.safetensors"])
def test_a_garbled_checkpoint_fails_in_one_line_naming_the_file(tmp_path, corpus_file, full, name):
    """Sampling from it, exporting it, or resuming a run whose every checkpoint is damaged: one line that names
    the file, not a traceback; and resume=auto does not quietly start again from step 0."""
    run_dir = tmp_path / "run"
    copy_until(full, run_dir, 10)
    for ckpt in ckpt_io.list_checkpoints(run_dir / "checkpoints"):
        garble(ckpt / name)
    newest = run_dir / "checkpoints" / "step_00000010"
    for script, *args in (("sample.py",), ("export.py", "--out", str(tmp_path / "out.safetensors"))):
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), str(newest), *args],
                              cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert f"{newest}: {name} does not match its checksum" in one_error_line(proc)
    overrides = tiny_overrides(tmp_path, corpus_file, {**EXTRA, "trainer.max_steps": 12})
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, "trainer.resume=auto", f"hydra.run.dir={run_dir}"]
    line = one_error_line(subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120))
    assert "no checkpoint in" in line and f"step_00000005: {name} does not match its checksum" in line
    assert [r["step"] for r in records(run_dir)][-1] == 10  # nothing dropped


@pytest.fixture
def disk(tmp_path):
    """mount(name, size) -> a small tmpfs (a disk that fills up, or is made read-only); skipped where the machine
    does not let the tests mount one (they need root)."""
    mounted: list[Path] = []

    def mount(name: str, size: str = "4m") -> Path:
        point = tmp_path / name
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}): needs root")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def read_only(point: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True, capture_output=True)


def fill(point: Path, leave: int) -> Path:
    """Fill the disk at `point` but for about `leave` bytes."""
    import os

    ballast = point / "ballast"
    free = os.statvfs(point).f_bavail * os.statvfs(point).f_frsize
    ballast.write_bytes(bytes(max(free - leave, 0)))
    return ballast


def test_a_disk_that_fills_during_a_checkpoint_fails_in_one_line_and_keeps_the_previous(
    tmp_path, corpus_file, full, disk, capsys
):
    """The checkpoint of step 10 does not fit: one line says the disk is full, step 5 is intact, no temporary
    directory is left; once space is freed, resume=auto continues exactly."""
    run_dir = disk("disk", "4m") / "run"
    train(tmp_path, corpus_file, run_dir, **{"trainer.max_steps": 5})
    ballast = fill(run_dir.parent, leave=64 * 1024)  # the metrics of steps 6-10 fit; a checkpoint (~450 KB) does not
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        train(tmp_path, corpus_file, run_dir, **{"trainer.resume": "auto"})
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1, lines
    assert "checkpoint of step 10 could not be written" in lines[0] and "the disk is full" in lines[0], lines
    assert "the previous checkpoint step_00000005 is intact" in lines[0]
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000005"]  # no .tmp_step_ leftovers
    assert ckpt_io.damage(ckpts / "step_00000005") is None
    ballast.unlink()
    train(tmp_path, corpus_file, run_dir, **{"trainer.resume": "auto"})
    assert by_step(records(run_dir)) == by_step(records(full))  # exact continuation


@pytest.mark.parametrize("leave, fails_at", [(0, "config.yaml"), (8192, "metrics.jsonl")])
def test_a_disk_full_before_or_during_the_run_fails_in_one_line(tmp_path, corpus_file, disk, capsys, leave, fails_at):
    """Whichever file meets the full disk first (the run's config.yaml at the start, metrics.jsonl some steps in):
    one line that names it and says the disk is full."""
    run_dir = disk("disk", "1m") / "run"
    run_dir.mkdir()
    fill(run_dir.parent, leave=leave)
    with pytest.raises(SystemExit) as info:
        train(tmp_path, corpus_file, run_dir, **{"trainer.ckpt_interval": 1000, "trainer.max_steps": 60})
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1, lines
    assert str(run_dir / fails_at) in lines[0] and "No space left on device" in lines[0], lines


def test_a_read_only_run_directory_fails_in_one_line_before_any_work(tmp_path, corpus_file, disk):
    """A new run into it, and a resume of the run it holds: one line each, from the command line, no traceback."""
    point = disk("disk")
    train(tmp_path, corpus_file, point / "old", **{"trainer.max_steps": 5})
    read_only(point)
    overrides = tiny_overrides(tmp_path, corpus_file, EXTRA)
    for run_dir, extra in ((point / "new", []), (point / "old", ["trainer.resume=auto"])):
        cmd = [sys.executable, str(REPO / "train.py"), *overrides, *extra, f"hydra.run.dir={run_dir}"]
        line = one_error_line(subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120))
        assert "cannot be written (Read-only file system)" in line and str(run_dir) in line, line


def test_a_read_only_checkpoint_directory_fails_before_the_first_step(tmp_path, corpus_file, disk, capsys):
    run_dir = tmp_path / "run"
    ckpts = disk("run/checkpoints") if (run_dir.mkdir() or True) else None
    read_only(ckpts)
    with pytest.raises(SystemExit) as info:
        train(tmp_path, corpus_file, run_dir)
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1, lines
    assert f"{ckpts} cannot be written (Read-only file system)" in lines[0]
    assert not (run_dir / "metrics.jsonl").exists()  # before any step


def test_a_checkpoint_write_into_a_read_only_directory_names_it(tmp_path, disk):
    """The same fault at the write itself (the directory turned read-only during the run)."""
    from models.minigpt import GPTConfig, MiniGPT
    from trainer.distributed import Dist
    from trainer.errors import ConfigError

    root = disk("ckpts")
    read_only(root)
    model = MiniGPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ConfigError, match=r"step 3 could not be written in .*Read-only file system"):
        ckpt_io.save_checkpoint(root, 3, lambda tmp: ckpt_io.write_files(tmp, model, {}, "cfg", None), Dist(), keep=2)


def test_an_unreadable_data_file_fails_in_one_line(tmp_path, monkeypatch):
    """Tests run as root, who can read a chmod-000 file: the reads themselves are made to fail, where the corpus
    is found (its binary probe) and where it is read (a file that became unreadable since)."""
    from trainer.errors import ConfigError

    path = tmp_path / "a.txt"
    path.write_text("some text")

    def denied(self_or_path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self_or_path))

    corpus = find_corpus(DataConfig(kind="text", path=str(path)))
    monkeypatch.setattr("trainer.data.corpus.open", denied, raising=False)
    with pytest.raises(ConfigError, match=rf"{path} cannot be read \(Permission denied\)"):
        find_corpus(DataConfig(kind="text", path=str(path)))
    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ConfigError, match=rf"{path} cannot be read \(Permission denied\)"):
        list(corpus.texts())


def test_a_run_directory_in_use_by_another_process_is_refused(tmp_path, corpus_file, full, capsys):
    """Two launches at once (a re-queued job while the first still runs, a resume=auto command run twice) would
    both pass the used-directory check; the second is refused in one line, and once the first ends it may go."""
    from trainer.entry.rundir import hold_run_dir

    held = hold_run_dir(full)  # the first launch, still running
    before = (full / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as info:
        train(tmp_path, corpus_file, full, **{"trainer.resume": "auto", "trainer.max_steps": 12})
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1 and f"{full} is in use by pid" in lines[0], lines
    assert (full / "metrics.jsonl").read_text() == before
    held.close()  # the first one ends (a killed process releases it the same way)
    train(tmp_path, corpus_file, full, **{"trainer.resume": "auto", "trainer.max_steps": 12})
    assert [r["step"] for r in records(full)][-1] == 12
