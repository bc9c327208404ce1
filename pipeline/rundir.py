"""The run folder: what `runs/<name>/` holds, and when a run or a fold in it may be reused.

    runs/<name>/config.yaml   the resolved config (every fold asked for so far)
    runs/<name>/fold<k>/      one fold, named by `FoldDir`:
        best.pt       weights of the epoch with the best validation competition score
        last.pt       model + optimizer + scheduler + loop state: enough to resume
        prev.pt       the last.pt before it (fallback when last.pt is found damaged)
        stage1.pt     the resume state at the switch to the stage-2 loss (run.keep_stage1)
        snapshot<c>.pt  the best epoch of lr cycle c (train.snapshots)
        log.csv       LOG_COLUMNS, one row per epoch
        oof.npy       float16 validation probabilities (101x101) of the fold's final model(s)
        oof_ids.txt   their ids, one per line, in the same order
        done.json     written last: the fold is complete (its training digest, its files' sha256)
        test_probs.npy     the fold's own test prediction (float16, `all`: predicted in the fold's
        test_predict.json  process as it finishes), named by digest in test_predict.json with the
                           done.json and test set it was made from; `predict` averages these

A fold is reused only if it was trained with the same `training_digest`: the hash of every
config key that decides the trained weights. No torch here: tune, show and the leaderboard
read run folders without it.

Whether a stage's output is finished, whole and current (done.json, tune.json, predict.json) is
pipeline/manifests.py.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline import fileio
from pipeline.config import MOVED_TRAIN_KEYS, Config, dump_yaml, flatten, load_config, save_config
from pipeline.errors import PipelineError

# val_score is that of the weights validated (the EMA when train.ema_decay is on); val_score_raw
# the raw weights' when they differ (empty otherwise).
# A blend's run folder (pipeline/blend.py) holds this file: its members, weights and search;
# the leaderboard lists the members from it.
BLEND_FILE = "blend.json"
LOG_COLUMNS = ["epoch", "lr", "train_loss", "val_loss", "val_score", "val_score_raw", "seconds"]
# Keys (or whole sections) that change where and how fast a run goes or how it is evaluated,
# not the weights it trains.
NON_TRAINING_KEYS = ("name", "runs_dir", "folds", "predict", "tune", "run")


def is_training_key(key: str) -> bool:
    return key not in NON_TRAINING_KEYS and key.split(".")[0] not in NON_TRAINING_KEYS


# Keys added after runs were made, at the value that reproduces what those runs did: left out
# of the digest at that value, so the older runs stay reusable.
NEUTRAL_DEFAULTS = {"train.ema_decay": 0.0, "model.residual": False, "loss.image_only": False,
                    "model.global_context": False, "pseudo.teacher": "", "pseudo.max_uncertain_share": 0.05,
                    "augment.rotate_limit": 0.0, "loss.lovasz_hinge": "relu", "model.input_norm": "none"}


def training_digest(cfg: Config) -> str:
    """Hash of everything that decides the trained weights: a fold is reused only if it matches."""
    relevant = {k: v for k, v in flatten(cfg).items()
                if is_training_key(k) and not (k in NEUTRAL_DEFAULTS and v == NEUTRAL_DEFAULTS[k])}
    relevant.update({f"train.{k}": v for k, v in MOVED_TRAIN_KEYS.items()})  # now run: keys, see config.py
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- one fold's files


@dataclass(frozen=True)
class FoldDir:
    """`runs/<name>/fold<k>/` and the names of what a fold writes there."""

    path: Path
    fold: int

    @classmethod
    def of(cls, run: Config | str | Path, fold: int) -> "FoldDir":
        """Fold `fold` of a run: a Config (its run_dir) or the run folder itself."""
        run_dir = run.run_dir if isinstance(run, Config) else Path(run)
        return cls(run_dir / f"fold{fold}", fold)

    best = property(lambda self: self.path / "best.pt")
    last = property(lambda self: self.path / "last.pt")
    prev = property(lambda self: self.path / "prev.pt")
    stage1 = property(lambda self: self.path / "stage1.pt")
    oof = property(lambda self: self.path / "oof.npy")
    oof_ids = property(lambda self: self.path / "oof_ids.txt")
    done = property(lambda self: self.path / "done.json")
    log = property(lambda self: self.path / "log.csv")
    lock = property(lambda self: self.path / "train.lock")
    train_out = property(lambda self: self.path / "train.out")  # a --parallel-folds worker's output
    pseudo = property(lambda self: self.path / "pseudo.npz")  # pipeline/pseudo.py's label cache
    branched_from = property(lambda self: self.path / "branched_from.json")
    test_probs = property(lambda self: self.path / PROBS_FILE)  # pipeline/predict.py's predict_fold_test
    test_predict = property(lambda self: self.path / FOLD_PREDICT_FILE)  # its manifest (manifests.py)

    def snapshot(self, cycle: int) -> Path:
        return self.path / f"snapshot{cycle}.pt"

    def snapshots(self) -> list[Path]:
        """The cycle snapshots kept so far, in cycle order."""
        return sorted(self.path.glob("snapshot*.pt"), key=lambda p: int(p.stem.removeprefix("snapshot")))

    def training_files(self) -> list[Path]:
        """What a fold started afresh must not find from an earlier training; done.json first, so
        a kill part-way through the removal never leaves a "finished" fold without its files."""
        return [self.done, self.best, self.last, self.prev, self.stage1, self.oof, self.oof_ids, self.log,
                *self.snapshots()]


def fold_is_done(cfg: Config, fold: int) -> bool:
    folder = FoldDir.of(cfg, fold)
    if not folder.done.exists():
        return False
    from pipeline.manifests import sha256_file

    try:
        done = fileio.read_json(folder.done)
        recorded = done.get("files")
        if recorded is None:  # a done.json from before it named its files: its OOF must be there
            return done.get("config_digest") == training_digest(cfg) and folder.oof.exists()
        # the files as finished, byte for byte: a damaged oof.npy or a removed best.pt makes the
        # fold not done, so `train`/`all` make it again instead of failing in a later stage
        return done.get("config_digest") == training_digest(cfg) and isinstance(recorded, dict) and \
            all((folder.path / name).is_file() and sha256_file(folder.path / name) == digest
                for name, digest in recorded.items())
    except (PipelineError, AttributeError, OSError):
        return False


def read_done(cfg: Config, fold: int) -> dict:
    return fileio.read_json(FoldDir.of(cfg, fold).done)


# ---------------------------------------------------------------- the run


def prepare_run_dir(cfg: Config, *, force: bool) -> None:
    """Create runs/<name>/ with config.yaml; refuse to reuse a run made with another config.

    A run trained fold by fold (`train --folds 0`, later `train --folds 1`) is one experiment:
    the saved config lists every fold asked for so far, so `tune` and `predict` see them all."""
    path = cfg.run_dir / "config.yaml"
    saved = cfg
    if path.exists() and not force:
        previous = load_config(path)
        if training_digest(previous) != training_digest(cfg):
            old, new = flatten(previous), flatten(cfg)
            changed = [k for k in new if old.get(k) != new[k] and is_training_key(k)]
            raise PipelineError(
                f"{path}: this run was made with a different config (differs in {', '.join(changed[:5])}); "
                "use another name, or --force to retrain"
            )
        saved = dataclasses.replace(cfg, folds=merged_folds(previous, cfg))
        if dump_yaml(previous) == dump_yaml(saved):
            return
    save_config(saved, path)


def merged_folds(previous: Config, requested: Config) -> list[int]:
    """The folds of a run asked for before and now ([] = all of them)."""
    folds = sorted(set(previous.fold_list()) | set(requested.fold_list()))
    return [] if folds == list(range(requested.n_folds)) else folds


# ---------------------------------------------------------------- log.csv


def write_log(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    fileio.write_text(path, buffer.getvalue())


def read_log(path: Path) -> list[dict]:
    """log.csv's rows ([] when there is none yet); each row's epoch is checked to be an integer,
    since resuming and branching keep the rows up to an epoch."""
    if not os.path.lexists(path):
        return []
    text = fileio.read_text(path)  # a folder, permissions, not UTF-8: one line naming it
    try:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise PipelineError(f"{path}: malformed CSV ({exc})") from None
    for line, row in enumerate(rows, start=2):
        if not str(row.get("epoch") or "").strip().isdigit():
            raise PipelineError(f"{path}: line {line} has epoch {row.get('epoch')!r}, expected a whole number "
                                "(a damaged training log: delete it, and training resumes without its earlier rows)")
    return rows


# ---------------------------------------------------------------- the run's files
# named here, read and written by the stages; their manifests are pipeline/manifests.py

PROBS_FILE = "test_probs.npy"
IDS_FILE = "test_ids.txt"
PREDICT_FILE = "predict.json"
FOLD_PREDICT_FILE = "test_predict.json"
TUNE_FILE = "tune.json"
OOF_FILES = ("oof.npy", "oof_ids.txt")
