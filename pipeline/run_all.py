"""The whole pipeline as one command: folds -> train -> tune -> predict -> submit -> show -> leaderboard.

Each stage is skipped when its output is whole and made from what the run holds now (the
manifests of pipeline/manifests.py: done.json, tune.json and predict.json name their inputs and
files by digest), so rerunning after a crash picks up where it stopped (training itself resumes
from last.pt); predict also reruns when the test set differs from the one predict.json recorded
(folder, ids, files). A run dir whose config differs from the requested one is refused by
`train` (see prepare_run_dir); `force=True` recomputes every stage.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import PipelineError


def run_all(cfg: Config, data_dir: str | None = None, *, force: bool = False,
            submission: str | None = None) -> Path:
    from pipeline.data import load_test
    from pipeline.folds import fold_summary, load_folds, make_folds_for_dir
    from pipeline.fileio import read_json
    from pipeline.leaderboard import format_leaderboard, record_run, save_wall_minutes
    from pipeline.predict import predict_run
    from pipeline.rundir import LEADERBOARD_CSV, FoldDir, RunDir, load_run_config
    from pipeline.manifests import predictions_are_current, tune_is_current
    from pipeline.show import show_run
    from pipeline.submit import submit_run
    from pipeline.train_folds import train_folds
    from pipeline.tune import tune_run

    started = time.perf_counter()
    if data_dir is not None:
        cfg.data = str(data_dir)
    if not (Path(cfg.data) / "train").is_dir():
        raise PipelineError(f"{cfg.data}: no train/ folder — give --data DIR in the Kaggle layout")
    # every input the run will need, before an hour of training: the test images are read here
    # (a missing folder or a damaged PNG is one line now, not after the last fold)
    load_test(cfg.data)
    run = cfg.run_dir
    files = RunDir(run)

    # 1. folds: one file shared by every experiment on this data, made once
    folds_csv = cfg.folds_path()
    if force or not folds_csv.exists():
        print(f"== folds: {folds_csv}")
        print(fold_summary(make_folds_for_dir(cfg.data, k=cfg.n_folds, seed=cfg.seed, out=folds_csv)))
    else:
        load_folds(folds_csv)

    # 2. train (skips complete folds, resumes interrupted ones). Only a run made from nothing
    # in this call has an end-to-end wall time; one finished piecemeal loses the one it had.
    fold_files = [FoldDir.of(run, k).done for k in cfg.fold_list()]
    from_nothing = force or not any(done.parent.exists() for done in fold_files)
    if not from_nothing and not all(done.exists() for done in fold_files):
        files.wall.unlink(missing_ok=True)
    print(f"== train: {run}")
    # each fold predicts the test set as it finishes, in its own process (its GPU): predict averages
    train_folds(cfg, resume=True, force=force, predict_test=True)

    # 3. tune threshold and min area on the OOF, unless tune.json was made from these very fold
    # results with this config (pipeline/manifests.py: digests, never modification times)
    run_cfg = load_run_config(run)
    if force or not tune_is_current(run_cfg, run):
        print("== tune")
        tune_run(run)
    else:
        print(f"== tune: {files.tune} is up to date")

    # 4. predict the test set with TTA, averaged over folds, unless predict.json names whole
    # predictions of these fold checkpoints for this test set as it is now
    if force or not predictions_are_current(run_cfg, run, cfg.data):
        print("== predict")
        predict_run(run, data_dir=cfg.data)
    else:
        print(f"== predict: {files.probs} is up to date")

    # 5. submission (checked as it is written), pictures and the leaderboard
    print("== submit")
    path = submit_run(run, out=submission, data_dir=cfg.data)
    print(f"wrote {path}")
    print("== show")
    page = (show_run(run, data_dir=cfg.data) or [files.show_page])[-1]
    print(f"pictures: {page}")
    minutes = (time.perf_counter() - started) / 60
    if from_nothing:  # the leaderboard row gains the wall time (tune wrote the row without it)
        save_wall_minutes(run, minutes, cfg.digest())
        record_run(run, read_json(files.tune))
    from pipeline.leaderboardpage import write_leaderboard_page

    board = write_leaderboard_page(LEADERBOARD_CSV, runs_dir=cfg.runs_dir)
    print()
    print(format_leaderboard(LEADERBOARD_CSV, top=10))
    note = "" if from_nothing else " (this call; the run existed before it)"
    print(f"\n{cfg.name}: done in {minutes:.1f} min{note}")
    print(where_things_are(run, path, page, board))
    return path


def where_things_are(run: Path, submission: Path, page: Path, board: Path | None = None) -> str:
    """The closing lines of `all`: what a user opens next."""
    from pipeline.rundir import LEADERBOARD_CSV, RunDir

    board_page = f", {board}" if board is not None else ""
    return "\n".join([
        f"  submission   {submission}",
        f"  leaderboard  {LEADERBOARD_CSV}{board_page}  (tgs leaderboard)",
        f"  pictures     {page}  (tables and pictures on one page)",
        f"  log          {RunDir(run).log}",
    ])
