"""Nothing wrong ever reaches a submission: kills at every write boundary of predict, submit
and a retrain, folds outside n_folds, diverging weights, bad inputs found before training.

The kills are real: the command runs in a subprocess that SIGKILLs itself at its N-th file
replace (tests/kill_at_write.py). After each, `submit` either refuses in one line or writes
exactly the submission of the predictions predict.json names, and the next run of the stage
makes the unit whole again. `pytest -m soak` kills at every boundary.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import fileio
from pipeline.cli import main
from pipeline.config import save_config
from pipeline.errors import PipelineError
from pipeline.predict import predict_run
from pipeline.manifests import predictions_are_current, tune_is_current
from pipeline.rundir import load_run_config
from pipeline.submit import check_submission, submit_run
from pipeline.checkpoints import load_checkpoint
from pipeline.train_folds import train_folds
from pipeline.tune import tune_run
from tests.test_train import tiny_config

# end to end (trained runs predicted, tuned and submitted): the fast suite, not the quick tier (pyproject.toml markers)
pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
PREDICT_WRITES = 3  # test_probs.npy, test_ids.txt, predict.json


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), NO_ALBUMENTATIONS_UPDATE="1")


def killed_at(n: int, when: str, *command: str, cwd: Path) -> int:
    """Run `python -m pipeline COMMAND` killing it at its n-th write boundary; its return code."""
    done = subprocess.run([sys.executable, "-m", "tests.kill_at_write", str(n), when, *command], cwd=cwd,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode in (-signal.SIGKILL, 0, 2), done.stderr[-2000:]
    return done.returncode


def temp_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob(f".*{fileio.TEMP_SUFFIX}"))


@pytest.fixture(scope="module")
def finished(synth_data, tmp_path_factory):
    """A tiny run trained (fold 0 of 3, 2 epochs), tuned and predicted without TTA, with the
    reference predictions and submissions of both TTAs the tests predict with."""
    root = tmp_path_factory.mktemp("integrity")
    cfg = tiny_config(synth_data, root, "run.threads=1")
    train_folds(cfg)
    run = cfg.run_dir
    tune_run(run, leaderboard_csv=root / "leaderboard.csv")
    references = {}
    for tta in ("hflip", "none"):  # "none" last: the state each test starts from
        predict_run(run, tta=tta)
        submission = submit_run(run, out=root / f"{tta}.csv")
        references[tta] = (np.load(run / "test_probs.npy"), submission.read_text())
    return run, references


@pytest.fixture
def run(finished, tmp_path, monkeypatch):
    """A private copy of the finished run (same name: its tune.json stays current)."""
    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "runs" / finished[0].name
    shutil.copytree(finished[0], copy)
    return copy


def submitted_or_refused(run: Path, references: dict, out: Path) -> str | None:
    """Submit; a refusal is one line. What is submitted must be the reference of the TTA that
    predict.json names, made from exactly the probabilities it names."""
    try:
        path = submit_run(run, out=out)
    except PipelineError as exc:
        assert "\n" not in str(exc)
        assert not predictions_are_current(load_run_config(run), run, load_run_config(run).data)
        return None
    tta = "+".join(json.loads((run / "predict.json").read_text())["tta"])
    probs, csv = references[tta]
    assert np.array_equal(np.load(run / "test_probs.npy"), probs)
    assert path.read_text() == csv
    return tta


def predict_killed_then_redone(run: Path, references: dict, n: int, when: str, tmp_path: Path) -> str | None:
    """Kill `predict --tta hflip` at its n-th write boundary, check what submit does with what is
    left, then predict again: the unit is whole, current, submitted as the reference, no temps left."""
    killed_at(n, when, "predict", "--run", str(run), "--tta", "hflip", cwd=tmp_path)
    outcome = submitted_or_refused(run, references, tmp_path / f"after-kill-{n}-{when}.csv")
    predict_run(run, tta="hflip")
    assert submitted_or_refused(run, references, tmp_path / "redone.csv") == "hflip"
    assert temp_files(run) == []
    return outcome


# ---------------------------------------------------------------- 1. --folds


@pytest.mark.parametrize("folds", ["7", "-1", "0,0"])
def test_train_folds_outside_n_folds_are_refused_before_anything_is_written(synth_data, tmp_path, capsys, folds):
    cfg = tiny_config(synth_data, tmp_path, "n_folds=2", "folds=[]")
    config_path = tmp_path / "tiny.yaml"
    save_config(cfg, config_path)
    assert main(["train", "--config", str(config_path), "--folds", folds]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--folds" in error
    assert not cfg.run_dir.exists()  # no config.yaml, no fold folder

    cfg.folds = [7]  # the API refuses it too, before config.yaml is written
    with pytest.raises(PipelineError, match="outside 0..1"):
        train_folds(cfg)
    assert not cfg.run_dir.exists()


def test_train_folds_outside_n_folds_leave_an_existing_run_config_untouched(finished, tmp_path, capsys):
    run = finished[0]
    before = (run / "config.yaml").read_bytes()
    config_path = tmp_path / "tiny.yaml"
    save_config(load_run_config(run), config_path)
    assert main(["train", "--config", str(config_path), "--folds", "0,3"]) == 2
    assert (run / "config.yaml").read_bytes() == before
    assert "outside 0..2" in capsys.readouterr().err


# ---------------------------------------------------------------- 2. predictions are one unit


def test_predict_killed_before_predict_json_leaves_predictions_submit_refuses(run, finished, tmp_path):
    # the window: new probabilities and ids beside the old predict.json
    outcome = predict_killed_then_redone(run, finished[1], PREDICT_WRITES, "before", tmp_path)
    assert outcome is None


def test_submit_refuses_predictions_whose_files_predict_json_does_not_name(run, finished, tmp_path):
    ids = (run / "test_ids.txt").read_text().split()
    (run / "test_ids.txt").write_text("\n".join(ids[1:] + ids[:1]) + "\n")  # the same ids, another order
    with pytest.raises(PipelineError, match="test_ids.txt: not the file predict.json names"):
        submit_run(run, out=tmp_path / "x.csv")
    (run / "test_ids.txt").write_text("\n".join(ids) + "\n")
    (run / "predict.json").unlink()  # a run predicted before predict.json named its files: predict again
    with pytest.raises(PipelineError, match="predict.json: missing"):
        submit_run(run, out=tmp_path / "x.csv")
    assert not predictions_are_current(load_run_config(run), run, load_run_config(run).data)


def test_submit_killed_leaves_the_old_submission_or_the_whole_new_one(run, finished, tmp_path):
    out = tmp_path / "submission.csv"
    out.write_text("old\n")
    for when in ("before", "after"):
        assert killed_at(1, when, "submit", "--run", str(run), "--out", str(out), cwd=tmp_path) == -signal.SIGKILL
        assert out.read_text() in ("old\n", finished[1]["none"][1])
    assert out.read_text() == finished[1]["none"][1]
    check_submission(out, load_run_config(run).data)
    assert submit_run(run, out=out).read_text() == finished[1]["none"][1]
    assert temp_files(tmp_path) == []  # the temp the kill before the rename left is gone


# ---------------------------------------------------------------- 3. a retrain killed mid-way


def test_an_interrupted_train_force_makes_predict_tune_and_submit_refuse(run, tmp_path, capsys):
    cfg = load_run_config(run)
    config_path = tmp_path / "tiny.yaml"
    save_config(cfg, config_path)
    # replace 4 is best.pt of the retrain's first epoch (after config.yaml, oof.npy, oof_ids.txt)
    assert killed_at(4, "after", "train", "--config", str(config_path), "--force", cwd=tmp_path) == -signal.SIGKILL
    assert (run / "fold0" / "best.pt").exists() and not (run / "fold0" / "done.json").exists()
    for command in (["submit", "--run", str(run), "--out", str(tmp_path / "x.csv")], ["predict", "--run", str(run)],
                    ["tune", "--run", str(run)]):
        capsys.readouterr()
        assert main(command) == 2, command
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "fold0/done.json: missing (fold 0 not finished)" in error, error
    assert not (tmp_path / "x.csv").exists()

    train_folds(cfg)  # the retrain finishes: the tune and predictions made before it are out of date
    assert not tune_is_current(cfg, run) and not predictions_are_current(cfg, run, cfg.data)
    with pytest.raises(PipelineError, match="tune.json: tuned on other fold results"):
        submit_run(run, out=tmp_path / "x.csv")
    tune_run(run, leaderboard_csv=tmp_path / "leaderboard.csv")
    with pytest.raises(PipelineError, match="predict.json: predicted with other fold checkpoints"):
        submit_run(run, out=tmp_path / "x.csv")
    predict_run(run)
    submit_run(run, out=tmp_path / "x.csv")


def test_predict_refuses_a_checkpoint_that_is_not_the_one_done_json_recorded(run, tmp_path):
    best = run / "fold0" / "best.pt"
    checkpoint = load_checkpoint(best)
    checkpoint["epoch"] = 0  # another file, as a later (killed) retrain would leave
    torch.save(checkpoint, best)
    with pytest.raises(PipelineError, match="best.pt: not the file done.json names"):
        predict_run(run)


# ---------------------------------------------------------------- 4. divergence


class DivergeAfterFirstEpoch:
    """A scheduler that sets the lr to inf after epoch 1 (as train.lr=inf would from the start)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self):
        for group in self.optimizer.param_groups:
            group["lr"] = float("inf")

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _all_finite(path: Path) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in load_checkpoint(path)["model"].values()
               if v.is_floating_point())


def test_divergence_after_an_epoch_points_at_a_finite_last_checkpoint(synth_data, tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.train_fold.build_scheduler", lambda cfg, optimizer: DivergeAfterFirstEpoch(optimizer))
    cfg = tiny_config(synth_data, tmp_path, "run.threads=1")
    with pytest.raises(PipelineError) as exc:
        train_folds(cfg)
    fold = cfg.run_dir / "fold0"
    assert f"epoch 2: loss became nan; training stopped, last good checkpoint kept at {fold / 'last.pt'}" \
        in str(exc.value)
    assert _all_finite(fold / "last.pt") and _all_finite(fold / "best.pt")
    assert not (fold / "done.json").exists()


@pytest.mark.parametrize("where", ["weights", "validation"])
def test_divergence_in_the_first_epoch_keeps_no_checkpoint_and_reports_no_score(synth_data, tmp_path, monkeypatch,
                                                                               capsys, where):
    # one batch an epoch: the loss is finite, the step makes the weights inf (train.lr=inf)
    cfg = tiny_config(synth_data, tmp_path, "run.threads=1", "train.limit_train=16")
    cfg.train.lr = float("inf")  # past load-time validation, as a diverging run gets there anyway
    if where == "validation":  # finite weights, non-finite probabilities
        cfg.train.lr = 1e-3
        monkeypatch.setattr("pipeline.train_fold.validate", lambda model, images, *args, **kwargs:
                            (np.full(images.shape, np.nan, np.float32), float("nan")))
    with pytest.raises(PipelineError) as exc:
        train_folds(cfg)
    message = str(exc.value)
    assert "\n" not in message and "epoch 1" in message and "no checkpoint kept" in message
    assert ("became NaN or infinite" if where == "weights" else "validation probabilities are NaN") in message
    fold = cfg.run_dir / "fold0"
    assert not any((fold / name).exists() for name in ("best.pt", "last.pt", "oof.npy", "done.json"))
    assert "val_score" not in capsys.readouterr().out


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    from pipeline.checkpoints import save_checkpoint

    with pytest.raises(PipelineError, match="weight w is NaN or infinite"):
        save_checkpoint(tmp_path / "best.pt", {"model": {"w": torch.tensor([1.0, float("nan")])}})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 5. inputs, ids, leaderboard, temps


@pytest.mark.parametrize("damage", ["no test folder", "damaged test image"])
def test_all_finds_bad_test_images_before_training(synth_data, tmp_path, monkeypatch, damage):
    from pipeline.run_all import run_all

    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    if damage == "no test folder":
        shutil.rmtree(data / "test")
    else:
        next((data / "test" / "images").glob("*.png")).write_bytes(b"not a png")
    monkeypatch.setattr("pipeline.train_folds.train_folds", lambda *a, **k: pytest.fail("trained before checking"))
    cfg = tiny_config(data, tmp_path)
    with pytest.raises(PipelineError) as exc:
        run_all(cfg)
    assert "\n" not in str(exc.value) and str(data / "test") in str(exc.value)
    assert not cfg.run_dir.exists()


def test_ids_with_whitespace_are_refused_on_load(tmp_path):
    from pipeline.data import list_image_ids
    from pipeline.folds import load_folds
    from pipeline.rle import read_rle_csv

    (tmp_path / "a b.png").write_bytes(b"")
    with pytest.raises(PipelineError, match="id 'a b' holds whitespace"):
        list_image_ids(tmp_path)
    (tmp_path / "train.csv").write_text("id,rle_mask\nok,1 1\na\tb,1 1\n")
    with pytest.raises(PipelineError, match="line 3: id 'a\\\\tb' holds whitespace"):
        read_rle_csv(tmp_path / "train.csv")
    (tmp_path / "folds.csv").write_text("id,fold\nok,0\nc d,1\n")
    with pytest.raises(PipelineError, match="line 3: id 'c d' holds whitespace"):
        load_folds(tmp_path / "folds.csv")


def test_leaderboard_with_an_unbalanced_quote_keeps_every_later_row(tmp_path, capsys):
    from pipeline.leaderboard import read_leaderboard

    path = tmp_path / "leaderboard.csv"
    path.write_text('run,cv_tuned,model\nfirst,0.7,"unet\nsecond,0.6,unet\nthird,0.5,unet\n')
    assert [row["run"] for row in read_leaderboard(path)] == ["first", "second", "third"]
    assert "line 2 has an unbalanced quote" in capsys.readouterr().err


def test_leaderboard_with_a_byte_order_mark_is_read_and_tune_records_into_it(finished, tmp_path):
    from pipeline.leaderboard import read_leaderboard

    path = tmp_path / "leaderboard.csv"
    path.write_text("\ufeffrun,cv_tuned\nold,0.5\n", encoding="utf-8")
    assert read_leaderboard(path) == [{"run": "old", "cv_tuned": "0.5", "empty_threshold": ""}]
    run = tmp_path / "runs" / finished[0].name
    shutil.copytree(finished[0], run)
    tune_run(run, leaderboard_csv=path)
    assert sorted(row["run"] for row in read_leaderboard(path)) == sorted([run.name, "old"])


@pytest.mark.parametrize("when", ["open", "write"])
def test_a_full_disk_at_the_leaderboard_lock_is_one_line(tmp_path, monkeypatch, when):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class FullHandle:
        def __init__(self, handle):
            self.handle = handle

        def __getattr__(self, name):
            return full if name in ("write", "flush", "truncate") else getattr(self.handle, name)

    monkeypatch.setattr(fileio.lock, "open", full if when == "open" else (lambda *a, **k: FullHandle(open(*a, **k))),
                        raising=False)
    with pytest.raises(PipelineError) as exc:
        with fileio.file_lock(tmp_path / "leaderboard.csv.lock", what="the leaderboard"):
            pass
    assert str(exc.value).startswith(f"{tmp_path / 'leaderboard.csv.lock'}: cannot")
    assert "No space left on device" in str(exc.value)


def test_temps_of_killed_writers_are_removed_by_the_next_write_into_their_folder(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    dead = tmp_path / f".test_probs.npy.{dead_pid}-abc123.tmp"
    live = tmp_path / f".other.txt.{os.getppid()}-def456.tmp"  # a writer still running
    for temp in (dead, live):
        temp.write_bytes(b"half a file")
    fileio.write_text(tmp_path / "test_ids.txt", "a\n")
    assert not dead.exists() and live.exists()


# ---------------------------------------------------------------- soak: every boundary


@pytest.mark.soak
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("n", range(1, PREDICT_WRITES + 1))
def test_soak_predict_killed_at_every_write_boundary(run, finished, tmp_path, n, when):
    outcome = predict_killed_then_redone(run, finished[1], n, when, tmp_path)
    # no unit while it is being replaced (predict.json goes first), the new one after; never a mix
    assert outcome == ("hflip" if (n, when) == (PREDICT_WRITES, "after") else None)


@pytest.mark.soak
@pytest.mark.parametrize("n", range(1, 9))
def test_soak_train_force_killed_at_every_write_boundary_of_its_first_epochs(run, finished, tmp_path, n):
    cfg = load_run_config(run)
    config_path = tmp_path / "tiny.yaml"
    save_config(cfg, config_path)
    killed_at(n, "after", "train", "--config", str(config_path), "--force", cwd=tmp_path)
    submitted = submitted_or_refused(run, finished[1], tmp_path / "after-kill.csv")
    assert submitted is None or (run / "fold0" / "done.json").exists()
    train_folds(cfg)
    tune_run(run, leaderboard_csv=tmp_path / "leaderboard.csv")
    predict_run(run, tta="none")
    assert submitted_or_refused(run, finished[1], tmp_path / "redone.csv") == "none"
    assert temp_files(run) == []
