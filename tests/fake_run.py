"""Hand-built run dirs in the layout train/predict produce, for testing tune/submit/show
without training: OOF probabilities are noisy versions of the true masks.

The fake model is deliberately under-confident (salt around 0.3, background around 0.05,
plus small spurious blobs on some empty images), so threshold 0.5 predicts nothing and
tuning has something real to find.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.config import Config, load_config, save_config
from pipeline.manifests import fold_file_digests
from pipeline.rundir import FoldDir, training_digest


def fake_probs(masks: np.ndarray, rng: np.random.Generator, salt: float = 0.3, blobs: bool = True) -> np.ndarray:
    """float32 [N,101,101]: salt ~ `salt` on the true mask shifted by up to 3 pixels (so IoU < 1),
    background ~ 0.05, and a spurious 3x3 blob on every other empty image."""
    shifted = np.stack([np.roll(mask, tuple(rng.integers(-3, 4, size=2)), axis=(0, 1)) for mask in masks])
    noise = rng.normal(0.0, 0.04, masks.shape).astype(np.float32)
    probs = np.where(shifted, salt, 0.05).astype(np.float32) + noise
    if blobs:
        empty = np.flatnonzero(~masks.any(axis=(1, 2)))
        for i in empty[::2]:
            row, col = rng.integers(5, 95, size=2)
            probs[i, row:row + 3, col:col + 3] = salt
    return np.clip(probs, 0.0, 1.0)


def write_fold(run: Path, fold: int, ids: list[str], probs: np.ndarray, seconds: float = 60.0,
               epochs: int = 3) -> None:
    folder = FoldDir.of(run, fold)
    folder.path.mkdir(parents=True, exist_ok=True)
    np.save(folder.oof, probs.astype(np.float16))
    folder.oof_ids.write_text("\n".join(ids) + "\n")
    rows = ["epoch,lr,train_loss,val_loss,val_score,seconds"]
    rows += [f"{e},0.001,{0.6 / e:.5f},{0.7 / e:.5f},{0.5 + 0.1 * e:.5f},{seconds / epochs:.1f}"
             for e in range(1, epochs + 1)]
    folder.log.write_text("\n".join(rows) + "\n")
    # done.json as training writes it: the run's training digest and its files' digests
    config_digest = training_digest(load_config(run / "config.yaml")) if (run / "config.yaml").exists() else ""
    folder.done.write_text(json.dumps(
        {"fold": fold, "best_epoch": epochs, "best_score": 0.7, "epochs_run": epochs, "seconds": seconds,
         "config_digest": config_digest, "files": fold_file_digests(folder.path, [])}))


def refinish_fold(fold_dir: Path) -> None:
    """done.json re-records the fold's files as they are now (a test that changed a fold's OOF
    on purpose, to reach the checks behind the digest check)."""
    done = json.loads((fold_dir / "done.json").read_text())
    done["files"] = fold_file_digests(fold_dir, [])
    (fold_dir / "done.json").write_text(json.dumps(done))


def write_fake_predictions(run: Path, ids: list[str], probs: np.ndarray, **meta) -> None:
    """test_probs.npy, test_ids.txt and predict.json as `predict` writes them, made from the
    run's folds as they are now."""
    from pipeline.data import fingerprint_data
    from pipeline.manifests import finished_folds, predict_recipe, write_predictions
    from pipeline.rundir import load_run_config

    cfg = load_run_config(run)
    write_predictions(run, list(ids), probs.astype(np.float16),
                      {"tta": ["none"], "folds": cfg.fold_list(), "n_images": len(ids), "data": cfg.data,
                       "test_fingerprint": fingerprint_data(cfg.data, "test"), "inputs": finished_folds(cfg, run),
                       "recipe": predict_recipe(cfg, cfg.predict.tta), **meta})


def fake_tune(run: Path, rule: dict) -> None:
    """tune.json holding `rule` (threshold, min_area, ...), recorded as tuned on the run's folds."""
    from pipeline.rundir import load_run_config
    from pipeline.manifests import tune_inputs

    (run / "tune.json").write_text(json.dumps({**rule, **tune_inputs(load_run_config(run), run)}))


def fake_config(data_dir: Path, root: Path, name: str = "fake", n_folds: int = 3, **changes) -> Config:
    cfg = Config(name=name, data=str(data_dir), folds_csv=str(root / f"folds-k{n_folds}.csv"),
                 runs_dir=str(root / "runs"), n_folds=n_folds)
    cfg.tune.thresholds = [round(0.1 + 0.05 * i, 2) for i in range(17)]
    cfg.tune.min_areas = [0, 5, 10, 20]
    for key, value in changes.items():
        section, _, field = key.partition("__")
        setattr(getattr(cfg, section) if field else cfg, field or section, value)
    return cfg


def private_copy(run: Path, tmp_path: Path, monkeypatch) -> Path:
    """A copy of a shared fake run that a test may change; the cwd moves to tmp_path so
    submissions/ (and the leaderboard) land there."""
    import shutil

    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "runs" / run.name
    shutil.copytree(run, copy)
    return copy


def make_fake_run(data_dir: Path, root: Path, name: str = "fake", n_folds: int = 3, seed: int = 0,
                  with_test: bool = True, **changes) -> Path:
    """runs/<name>/ with config.yaml, fold<k>/{oof.npy, oof_ids.txt, log.csv, done.json} for every
    fold of a folds file made from data_dir, and test_probs.npy + test_ids.txt + predict.json."""
    from pipeline.data import list_image_ids, load_train
    from pipeline.folds import load_folds, make_folds_for_dir

    cfg = fake_config(data_dir, root, name, n_folds, **changes)
    if not Path(cfg.folds_csv).exists():
        make_folds_for_dir(data_dir, k=n_folds, seed=42, out=cfg.folds_csv)
    run = cfg.run_dir
    save_config(cfg, run / "config.yaml")
    rng = np.random.default_rng(seed)
    train = load_train(data_dir)
    probs = fake_probs(np.asarray(train.masks, bool), rng)
    index_of = {image_id: i for i, image_id in enumerate(train.ids)}
    folds = load_folds(cfg.folds_csv)
    for fold in cfg.fold_list():
        # training writes ids in its own order; shuffle so assembly must really reorder
        ids = list(rng.permutation(folds.loc[folds["fold"] == fold, "id"].astype(str).to_numpy()))
        write_fold(run, fold, ids, probs[[index_of[i] for i in ids]], seconds=60.0 * (fold + 1))
    if with_test:
        test_ids = list_image_ids(Path(data_dir) / "test" / "images")
        test_truth = np.zeros((len(test_ids), 101, 101), bool)
        test_truth[::2, 20:60, 30:80] = True  # every other test image gets a salt block
        write_fake_predictions(run, test_ids, fake_probs(test_truth, rng, salt=0.7, blobs=False))
    return run
