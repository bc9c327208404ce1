"""Nothing is lost under a full disk, stale state or a second process on the same run.

- Disk full: a checkpoint, a submission or the leaderboard whose write fails with ENOSPC
  (in write() or in fsync()) fails in one line (exit 2 through the CLI), leaves the previous
  file intact and no temp file, and the next run picks up what was not done.
- Stale state: `all` never reuses a run dir made with another config, recomputes tune and
  predict when their inputs changed (a fold retrained, another test set in the same folder),
  and `--force` recomputes everything.
- Concurrency: a second `all` on a fold that `train` is training fails at once, naming the
  holder's pid. (Concurrent leaderboard writes: tests/test_leaderboard.py::
  test_concurrent_record_run_calls_all_land.)

The fuzzed bad-input properties are in tests/test_fuzz.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.checkpoints import load_checkpoint, save_checkpoint
from pipeline.cli import main
from pipeline.config import save_config
from pipeline.errors import PipelineError
from pipeline.fileio import read_json
from pipeline.train_folds import train_folds
from pipeline.leaderboard import COLUMNS, read_leaderboard
from pipeline.rle import write_rle_csv
from pipeline.rundir import read_log
from pipeline.run_all import run_all
from tests.fake_run import make_fake_run, private_copy
from tests.test_train import tiny_config

# end to end (`all` and training runs under faults): the fast suite, not the quick tier (pyproject.toml markers)
pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fault injection


class FullDiskFile:
    """A file handle on a full disk: the first `allowed` characters are written, then ENOSPC."""

    def __init__(self, handle, allowed: int):
        self._handle, self._left = handle, allowed

    def write(self, data):
        if len(data) > self._left:
            self._handle.write(data[:self._left])
            self._left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._handle.close()


def _is_temp_of(fd: int, target_name: str) -> bool:
    # fileio.atomic_open writes ".<name>.<random>.tmp" beside the target
    return Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{target_name}.")


@contextlib.contextmanager
def disk_full(target_name: str, where: str, after: int = 0):
    """Writes of files named `target_name` fail with ENOSPC in write() or fsync(), from the
    (after+1)-th such write on; every other file is written normally."""
    seen = {"count": 0}

    def should_fail(fd: int) -> bool:
        if not _is_temp_of(fd, target_name):
            return False
        seen["count"] += 1
        return seen["count"] > after

    real_fdopen, real_fsync = os.fdopen, os.fsync

    def fdopen(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        return FullDiskFile(handle, allowed=64) if should_fail(fd) else handle

    def fsync(fd):
        if should_fail(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    with pytest.MonkeyPatch.context() as patch:
        if where == "write":
            patch.setattr(os, "fdopen", fdopen)
        else:
            patch.setattr(os, "fsync", fsync)
        yield


def temp_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob(".*.tmp")]


def one_error_line(err: str) -> str:
    """The error of a failed command: exactly one line, the last thing on stderr (training's
    progress bars, redrawn with \r, may come before it)."""
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), err
    return errors[0]


# ---------------------------------------------------------------- disk full


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_checkpoint_on_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, where):
    path = tmp_path / "last.pt"
    previous = {"model": {"w": torch.arange(6.0)}, "epoch": 3}
    save_checkpoint(path, previous)
    with disk_full("last.pt", where), pytest.raises(PipelineError) as info:
        save_checkpoint(path, {"model": {"w": torch.zeros(10_000)}, "epoch": 4})
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: could not write (No space left on device)")
    assert torch.equal(load_checkpoint(path)["model"]["w"], previous["model"]["w"])
    assert load_checkpoint(path)["epoch"] == 3
    assert temp_files(tmp_path) == []


def test_training_on_a_full_disk_exits_2_in_one_line_and_resumes_afterwards(synth_data, tmp_path, capsys):
    cfg = tiny_config(synth_data, tmp_path, "train.epochs=2")
    config_path = tmp_path / "tiny.yaml"
    save_config(cfg, config_path)
    fold = cfg.run_dir / "fold0"
    # epoch 1's last.pt is written; epoch 2's hits the full disk (inside torch.save's writes)
    with disk_full("last.pt", "write", after=1):
        assert main(["train", "--config", str(config_path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{fold / 'last.pt'}: could not write (No space left on device)" in line
    assert temp_files(tmp_path) == []
    # epoch 1's checkpoint survives (rotated to prev.pt) and the log agrees with it
    assert load_checkpoint(fold / "prev.pt")["state"]["epoch"] == 1
    assert [int(row["epoch"]) for row in read_log(fold / "log.csv")] == [1]
    assert not (fold / "done.json").exists()

    assert main(["train", "--config", str(config_path)]) == 0
    assert "resuming at epoch 2/2" in capsys.readouterr().out
    assert read_json(fold / "done.json")["epochs_run"] == 2
    assert [int(row["epoch"]) for row in read_log(fold / "log.csv")] == [1, 2]
    assert temp_files(tmp_path) == []


@pytest.fixture(scope="module")
def fake_run(synth_data, tmp_path_factory) -> Path:
    """A trained-looking run (OOF + test probabilities) built without training."""
    return make_fake_run(synth_data, tmp_path_factory.mktemp("fake"))


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_submission_on_a_full_disk_is_one_line_and_keeps_the_previous_submission(fake_run, tmp_path, monkeypatch,
                                                                                  capsys, where):
    run = private_copy(fake_run, tmp_path, monkeypatch)
    assert main(["tune", "--run", str(run)]) == 0
    assert main(["submit", "--run", str(run)]) == 0
    submission = tmp_path / "submissions" / "fake.csv"
    previous = submission.read_bytes()
    capsys.readouterr()
    with disk_full("fake.csv", where):
        assert main(["submit", "--run", str(run)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "submissions/fake.csv: could not write (No space left on device)" in line
    assert submission.read_bytes() == previous
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_leaderboard_on_a_full_disk_keeps_its_rows_and_the_run_is_tuned_again(fake_run, tmp_path, monkeypatch,
                                                                               capsys, where):
    run = private_copy(fake_run, tmp_path, monkeypatch)
    board = tmp_path / "submissions" / "leaderboard.csv"
    board.parent.mkdir()
    board.write_text(",".join(COLUMNS) + "\n" + ",".join(["older", "seed_unet", "bce", "5/5", "0.7", "0.8"]
                                                         + [""] * (len(COLUMNS) - 6)) + "\n")
    previous = board.read_bytes()
    with disk_full("leaderboard.csv", where):
        assert main(["tune", "--run", str(run)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "leaderboard.csv: could not write (No space left on device)" in line
    assert board.read_bytes() == previous
    assert temp_files(tmp_path) == []
    # no tune.json claims the run is tuned, so `all` tunes (and records) it again
    assert not (run / "tune.json").exists()
    assert main(["tune", "--run", str(run)]) == 0
    assert sorted(row["run"] for row in read_leaderboard(board)) == ["fake", "older"]


# ---------------------------------------------------------------- stale state


def _stages_run(out: str) -> set[str]:
    """The stages run_all recomputed: it prints "== folds: PATH" when it makes the folds file,
    "== tune" when it tunes and "== tune: ... is up to date" when it does not (predict alike)."""
    made_folds = {"folds"} if re.search(r"^== folds: ", out, re.M) else set()
    return made_folds | {name for name in ("tune", "predict") if re.search(rf"^== {name}$", out, re.M)}


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def quiet_all(monkeypatch, tmp_path):
    """run_all in tmp_path (submissions/ lands there) without the pictures stage, which reads
    no stage state and would only cost time here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("pipeline.show.show_run", lambda *args, **kwargs: [])


def test_all_refuses_a_run_dir_made_with_another_config_and_changes_nothing(synth_data, tmp_path, quiet_all,
                                                                           capsys):
    cfg = tiny_config(synth_data, tmp_path, "train.epochs=1")
    run_all(cfg)
    before = _mtimes(tmp_path)
    capsys.readouterr()

    other = tiny_config(synth_data, tmp_path, "train.epochs=1", "train.lr=0.01")
    config_path = tmp_path.parent / f"{tmp_path.name}-other.yaml"  # outside tmp_path: compared below
    save_config(other, config_path)
    assert main(["all", "--config", str(config_path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{cfg.run_dir / 'config.yaml'}: this run was made with a different config (differs in train.lr" in line
    # no stage ran, no file was touched but the run's log.txt, which records the refusal
    log = cfg.run_dir / "log.txt"
    assert {k: v for k, v in _mtimes(tmp_path).items() if Path(k) != log.relative_to(tmp_path)} == before
    assert log.read_text().splitlines()[-2].endswith(line.strip())


def test_all_records_its_wall_time_only_for_a_run_it_made_from_nothing(synth_data, tmp_path, quiet_all):
    cfg = tiny_config(synth_data, tmp_path, "train.epochs=1")
    run_all(cfg)
    (row,) = read_leaderboard(tmp_path / "submissions" / "leaderboard.csv")
    assert (cfg.run_dir / "wall.json").exists()
    assert float(row["wall_minutes"]) >= 0  # a tiny run can round to 0.0 minutes

    (cfg.run_dir / "fold0" / "done.json").unlink()  # finished piecemeal from here: no wall time
    run_all(tiny_config(synth_data, tmp_path, "train.epochs=1"))
    assert not (cfg.run_dir / "wall.json").exists()
    (row,) = read_leaderboard(tmp_path / "submissions" / "leaderboard.csv")
    assert row["wall_minutes"] == ""


def test_all_recomputes_exactly_the_stages_whose_inputs_changed(synth_data, tmp_path, quiet_all, capsys):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    cfg = tiny_config(data, tmp_path, "train.epochs=1")
    run, test_images = cfg.run_dir, data / "test" / "images"
    submission = tmp_path / "submissions" / "tiny.csv"

    def all_again(**kwargs) -> set[str]:
        capsys.readouterr()
        run_all(tiny_config(data, tmp_path, "train.epochs=1"), **kwargs)
        return _stages_run(capsys.readouterr().out)

    assert all_again() == {"folds", "tune", "predict"}
    assert all_again() == set()  # nothing changed: every stage up to date

    # a different test set in the same folder: one image gone, a new id in its place
    ids = sorted(p.stem for p in test_images.glob("*.png"))
    (test_images / f"{ids[0]}.png").rename(test_images / "fresh00000.png")
    write_rle_csv(data / "sample_submission.csv", ["fresh00000"] + ids[1:], ["1 1"] * len(ids))  # comes with it
    assert all_again() == {"predict"}
    submitted = [line.split(",")[0] for line in submission.read_text().splitlines()[1:]]
    assert sorted(submitted) == sorted(["fresh00000"] + ids[1:])

    # the same ids, one image replaced by another's pixels
    shutil.copyfile(test_images / f"{ids[2]}.png", test_images / f"{ids[1]}.png")
    predicted = (run / "test_ids.txt").read_text().split()
    one, two = predicted.index(ids[1]), predicted.index(ids[2])
    before = np.load(run / "test_probs.npy")
    assert all_again() == {"predict"}
    after = np.load(run / "test_probs.npy")
    assert not np.array_equal(before[one], before[two]) and np.array_equal(after[one], after[two])

    # a damaged predict.json is predicted again, not trusted and not fatal
    (run / "predict.json").write_text("{")
    assert all_again() == {"predict"}

    # a fold retrained outside `all`: its OOF and weights changed, so tune and predict rerun
    train_folds(tiny_config(data, tmp_path, "train.epochs=1"), force=True)
    assert all_again() == {"tune", "predict"}

    # --force recomputes everything, the fold included
    done_before = (run / "fold0" / "done.json").stat().st_mtime_ns
    assert all_again(force=True) == {"folds", "tune", "predict"}
    assert (run / "fold0" / "done.json").stat().st_mtime_ns != done_before
    assert all_again() == set()


# ---------------------------------------------------------------- two processes


HOLD_FOLD = """
import sys
import pipeline.train_fold

def hold(cfg, fold, *args, **kwargs):  # stands in for training: holds the fold's lock until told
    print("holding", flush=True)
    sys.stdin.read()
    raise SystemExit(0)

pipeline.train_fold.train_fold = hold
from pipeline.cli import main
sys.exit(main(["train", "--config", sys.argv[1]]))
"""


def test_second_process_on_a_fold_being_trained_fails_at_once_naming_the_holder(synth_data, tmp_path):
    cfg = tiny_config(synth_data, tmp_path, "train.epochs=1")
    config_path = tmp_path / "tiny.yaml"
    save_config(cfg, config_path)
    env = dict(os.environ, PYTHONPATH=str(REPO), NO_ALBUMENTATIONS_UPDATE="1")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_FOLD, str(config_path)], cwd=tmp_path, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the holder prints what training prints (e.g. making the folds file) before "holding"
        assert any(line.strip() == "holding" for line in holder.stdout), "the holder exited before the lock"
        second = subprocess.run([sys.executable, "-m", "pipeline", "all", "--config", str(config_path)],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        line = one_error_line(second.stderr)
        assert f"train.lock: fold 0 of run tiny is in use by pid {holder.pid}" in line
        assert not (cfg.run_dir / "fold0" / "last.pt").exists()  # the second process trained nothing
    finally:
        _, holder_err = holder.communicate(timeout=60)  # closes its stdin: the holder returns
    assert holder.returncode == 0, holder_err
