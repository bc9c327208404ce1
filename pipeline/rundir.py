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

A fold is reused only if it was trained with the same `training_digest`: the hash of every
config key that decides the trained weights. No torch here: tune, show and the leaderboard
read run folders without it.

Stage manifests (the bottom of this file): each stage's output is a unit named by a manifest
written last, after the files it names, and every stage checks what it reads against them.
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
from typing import Any

from pipeline import fileio
from pipeline.config import Config, dump_yaml, flatten, load_config, save_config
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
                    "augment.rotate_limit": 0.0, "loss.lovasz_hinge": "relu"}


def training_digest(cfg: Config) -> str:
    """Hash of everything that decides the trained weights: a fold is reused only if it matches."""
    relevant = {k: v for k, v in flatten(cfg).items()
                if is_training_key(k) and not (k in NEUTRAL_DEFAULTS and v == NEUTRAL_DEFAULTS[k])}
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
    try:
        done = fileio.read_json(folder.done)
        recorded = done.get("files") or {folder.oof.name: ""}  # a done.json from before it named its files
        return done.get("config_digest") == training_digest(cfg) and \
            all((folder.path / name).exists() for name in recorded)
    except (PipelineError, AttributeError):
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


# ---------------------------------------------------------------- stage manifests
# Is a stage's output finished, whole, and made from what the run holds now?
#
# Each stage's output is a unit named by a manifest written last, after the files it names:
#
#     fold<k>/done.json  the fold is finished: its training digest and the sha256 of oof.npy,
#                        oof_ids.txt and the checkpoint(s) `predict` averages ("files")
#     tune.json          the rule, with the fold tokens (sha256 of each done.json) it was tuned on
#                        ("inputs") and the config digest
#     predict.json       sha256 of test_probs.npy and test_ids.txt ("files"), the fold tokens of
#                        the checkpoints predicted with ("inputs"), the test set's fingerprint
#
# A kill between two writes of a stage leaves a manifest that no longer names what is beside it
# (or no manifest), so readers refuse the unit and `all` makes it again; a retrained fold has a new
# done.json, so every tune.json and predict.json made before it is out of date. Readers never
# trust a file's modification time. A done.json, tune.json or predict.json written before the
# manifests existed: done.json is still a finished fold (its files are not checked: retraining
# costs hours), but a tune.json or predict.json without "inputs" is out of date (both are
# minutes to remake: `submit` says which command to run, `all` reruns it).

PROBS_FILE = "test_probs.npy"
IDS_FILE = "test_ids.txt"
PREDICT_FILE = "predict.json"
TUNE_FILE = "tune.json"
OOF_FILES = ("oof.npy", "oof_ids.txt")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(folder: Path, names) -> dict[str, str]:
    return {name: sha256_file(folder / name) for name in names}


def check_files(folder: Path, recorded: Any, manifest: Path, rerun: str) -> None:
    """Every file `recorded` ({name: sha256}) names is in `folder` with that content."""
    if not isinstance(recorded, dict) or not recorded:
        raise PipelineError(f"{manifest}: names no files (written before manifests, or damaged) — {rerun}")
    for name, expected in recorded.items():
        path = folder / str(name)
        if not path.is_file():
            raise PipelineError(f"{path}: missing, {manifest.name} names it — {rerun}")
        if sha256_file(path) != expected:
            raise PipelineError(f"{path}: not the file {manifest.name} names (a write was interrupted, "
                                f"or it was changed since) — {rerun}")


def read_done_token(run: Path, fold: int) -> tuple[dict, str]:
    """(fold<k>/done.json, its token: the sha256 of its bytes); PipelineError when it is missing
    or unreadable."""
    path = FoldDir.of(run, fold).done
    if not path.is_file():
        state = "not trained" if not path.parent.is_dir() else "not finished"
        raise PipelineError(f"{path}: missing (fold {fold} {state}) — run `python -m pipeline train`")
    raw = path.read_bytes()  # parsed from these very bytes: the token names what was read
    try:
        done = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc}) — run `python -m pipeline train`") from None
    if not isinstance(done, dict):
        raise PipelineError(f"{path}: not a done marker (a JSON object expected) — run `python -m pipeline train`")
    return done, hashlib.sha256(raw).hexdigest()


def finished_folds(cfg: Config, run: Path | None = None) -> dict[str, str]:
    """{"fold<k>": token} for every fold of the run, each finished with the run's config;
    PipelineError naming the first that is not (missing, unfinished, trained with another config)."""
    run = Path(run) if run is not None else cfg.run_dir
    digest = training_digest(cfg)
    tokens = {}
    for fold in cfg.fold_list():
        done, token = read_done_token(run, fold)
        if done.get("config_digest") != digest:
            raise PipelineError(f"{FoldDir.of(run, fold).done}: fold {fold} was trained with another "
                                "config than the run's config.yaml — run `python -m pipeline train`")
        tokens[f"fold{fold}"] = token
    return tokens


def fold_file_digests(fold_dir: Path, checkpoints: list[Path]) -> dict[str, str]:
    """What a fold's done.json records: the sha256 of its OOF and of the checkpoints predicted with."""
    return file_digests(fold_dir, [*OOF_FILES, *(p.name for p in checkpoints)])


def check_fold_files(run: Path, fold: int, names, rerun: str = "run `python -m pipeline train --force`") -> None:
    """The files `names` of the fold are those its done.json recorded (a done.json from before the
    manifests recorded nothing: accepted as it is)."""
    folder = FoldDir.of(run, fold)
    done, _ = read_done_token(run, fold)
    recorded = done.get("files")
    if recorded is None:
        return
    if not isinstance(recorded, dict):
        raise PipelineError(f"{folder.done}: 'files' is not a mapping — {rerun}")
    unnamed = [name for name in names if name not in recorded]
    if unnamed:
        raise PipelineError(f"{folder.path / unnamed[0]}: not recorded in done.json as the fold's — {rerun}")
    check_files(folder.path, {name: recorded[name] for name in names}, folder.done, rerun)


# ---------------------------------------------------------------- tune.json


def _tune_digest(cfg: Config) -> str:
    # the run's name and place are not what it was tuned with: a moved run stays tuned
    return cfg.digest(ignore=("folds", "runs_dir", "name"))


def _check_recorded_folds(path: Path, recorded: Any, current: dict[str, str], what: str, stale: str,
                          rerun: str) -> None:
    """The done.json tokens a record (tune.json, predict.json) was made from equal the run's now."""
    if not isinstance(recorded, dict):
        raise PipelineError(f"{path}: does not record {what} (older version) — {rerun}")
    if recorded != current:
        changed = sorted(set(recorded) ^ set(current)) or [k for k in current if recorded[k] != current[k]]
        raise PipelineError(f"{path}: {stale} ({changed[0]} differs) — {rerun}")


def tune_inputs(cfg: Config, run: Path) -> dict[str, Any]:
    """What tune.json records of its inputs (see `tune_is_current`)."""
    return {"inputs": finished_folds(cfg, run), "config_digest": _tune_digest(cfg)}


def check_tune_current(cfg: Config, run: Path, tuned: dict) -> None:
    """tune.json was made from the folds as they are now, with this config (PipelineError if not)."""
    path = run / TUNE_FILE
    rerun = f"run `python -m pipeline tune --run {run}`"
    _check_recorded_folds(path, tuned.get("inputs"), finished_folds(cfg, run),
                          "the fold results it was tuned on", "tuned on other fold results than the run's", rerun)
    if tuned.get("config_digest") != _tune_digest(cfg):
        raise PipelineError(f"{path}: tuned with another config than the run's config.yaml — {rerun}")


def tune_is_current(cfg: Config, run: Path) -> bool:
    try:
        tuned = fileio.read_json(run / TUNE_FILE)
        if not isinstance(tuned, dict):
            return False
        check_tune_current(cfg, run, tuned)
    except PipelineError:
        return False
    return True


# ---------------------------------------------------------------- test predictions


def write_predictions(run: Path, ids: list[str], probs, meta: dict[str, Any]) -> None:
    """test_probs.npy, test_ids.txt, then predict.json naming both by digest (written last; the
    old one goes first, so no record claims a prediction while it is being replaced)."""
    (run / PREDICT_FILE).unlink(missing_ok=True)
    fileio.write_npy(run / PROBS_FILE, probs)
    fileio.write_text(run / IDS_FILE, "\n".join(ids) + "\n")
    fileio.write_json(run / PREDICT_FILE, {**meta, "files": file_digests(run, (PROBS_FILE, IDS_FILE))})


def read_predict_meta(run: Path) -> dict:
    """predict.json, checked to name the test_probs.npy and test_ids.txt beside it."""
    rerun = f"run `python -m pipeline predict --run {run}`"
    path = run / PREDICT_FILE
    if not path.is_file():
        raise PipelineError(f"{path}: missing (predictions never finished) — {rerun}")
    meta = fileio.read_json(path)
    if not isinstance(meta, dict):
        raise PipelineError(f"{path}: not a JSON object — {rerun}")
    check_files(run, meta.get("files"), path, rerun)
    return meta


def check_predictions_current(cfg: Config, run: Path, meta: dict) -> None:
    """predict.json was made with the fold checkpoints the run holds now (PipelineError if not)."""
    rerun = f"run `python -m pipeline predict --run {run}`"
    path = run / PREDICT_FILE
    _check_recorded_folds(path, meta.get("inputs"), finished_folds(cfg, run),
                          "the folds it predicted with", "predicted with other fold checkpoints than the run's", rerun)


def predictions_are_current(cfg: Config, run: Path, data: str) -> bool:
    """A whole, current prediction of the test set in `data` as it is now (same folder, ids, files)."""
    from pipeline.data import fingerprint_test_images

    try:
        meta = read_predict_meta(run)
        check_predictions_current(cfg, run, meta)
        return meta.get("data") == str(data) and meta.get("test_fingerprint") == fingerprint_test_images(data)
    except PipelineError:
        return False
