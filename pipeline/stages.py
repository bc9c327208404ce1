"""The whole pipeline as one command: folds -> train -> tune -> predict -> submit -> leaderboard.

Each stage is skipped when its outputs exist and are newer than its inputs, so rerunning
after a crash picks up where it stopped (training itself resumes from last.pt); predict also
reruns when the test set differs from the one predict.json recorded (folder, ids, files). A run dir
whose config differs from the requested one is refused by `train` (see prepare_run_dir);
`force=True` recomputes every stage.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import PipelineError


def _newest_mtime(paths) -> float:
    return max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)


def _is_fresh(output: Path, inputs: list[Path]) -> bool:
    return output.exists() and output.stat().st_mtime >= _newest_mtime(inputs)


def run_all(cfg: Config, data_dir: str | None = None, *, force: bool = False,
            submission: str | None = None) -> Path:
    from pipeline.folds import fold_summary, load_folds, make_folds_for_dir
    from pipeline.fileio import read_json
    from pipeline.leaderboard import WALL_FILE, format_leaderboard, record_run, save_wall_minutes
    from pipeline.predict import predict_run
    from pipeline.rundir import FoldDir
    from pipeline.show import show_run
    from pipeline.submit import submit_run
    from pipeline.folds_runner import train_folds
    from pipeline.tune import tune_run

    started = time.perf_counter()
    if data_dir is not None:
        cfg.data = str(data_dir)
    if not (Path(cfg.data) / "train").is_dir():
        raise PipelineError(f"{cfg.data}: no train/ folder — give --data DIR in the Kaggle layout")
    run = cfg.run_dir

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
        (run / WALL_FILE).unlink(missing_ok=True)
    print(f"== train: {run}")
    train_folds(cfg, resume=True, force=force)

    # 3. tune threshold and min area on the OOF
    if force or not _is_fresh(run / "tune.json", fold_files + [run / "config.yaml"]):
        print("== tune")
        tune_run(run)
    else:
        print(f"== tune: {run / 'tune.json'} is up to date")

    # 4. predict the test set with TTA, averaged over folds
    best_files = [FoldDir.of(run, k).best for k in cfg.fold_list()]
    if force or not _is_fresh(run / "test_probs.npy", best_files + [run / "config.yaml"]) \
            or not _same_test_set(run, cfg.data):
        print("== predict")
        predict_run(run, data_dir=cfg.data)
    else:
        print(f"== predict: {run / 'test_probs.npy'} is up to date")

    # 5. submission (checked as it is written), pictures and the leaderboard
    print("== submit")
    path = submit_run(run, out=submission, data_dir=cfg.data)
    print(f"wrote {path}")
    print("== show")
    page = (show_run(run, data_dir=cfg.data) or [run / "show" / "index.html"])[-1]
    print(f"pictures: {page}")
    minutes = (time.perf_counter() - started) / 60
    if from_nothing:  # the leaderboard row gains the wall time (tune wrote the row without it)
        save_wall_minutes(run, minutes, cfg.digest())
        record_run(run, read_json(run / "tune.json"))
    print()
    print(format_leaderboard("submissions/leaderboard.csv", top=10))
    note = "" if from_nothing else " (this call; the run existed before it)"
    print(f"\n{cfg.name}: done in {minutes:.1f} min{note}")
    print(where_things_are(run, path, page))
    return path


def where_things_are(run: Path, submission: Path, page: Path) -> str:
    """The closing lines of `all`: what a user opens next."""
    return "\n".join([
        f"  submission   {submission}",
        "  leaderboard  submissions/leaderboard.csv  (tgs leaderboard)",
        f"  pictures     {page}  (tables and pictures on one page)",
        f"  log          {run / 'log.txt'}",
    ])


def _same_test_set(run: Path, data: str) -> bool:
    """predict.json says the test set was predicted from this folder as it is now (same path,
    same ids, same files); an unreadable predict.json means predicting again, not failing."""
    from pipeline.data import fingerprint_test_images
    from pipeline.fileio import read_json

    meta_path = run / "predict.json"
    if not meta_path.exists():
        return False
    try:
        meta = read_json(meta_path)
    except PipelineError:
        return False
    return isinstance(meta, dict) and meta.get("data") == str(data) \
        and meta.get("test_fingerprint") == fingerprint_test_images(data)
