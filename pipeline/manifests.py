"""Stage manifests: is a stage's output finished, whole, and made from what the run holds now?

Each stage's output is a unit named by a manifest written last, after the files it names:

    fold<k>/done.json  the fold is finished: its training digest, the sha256 of oof.npy,
                       oof_ids.txt and the checkpoint(s) `predict` averages ("files") and the
                       content fingerprint of the train data it was trained on
                       ("train_fingerprint"); `train`/`all` train a fold whose done.json no
                       longer holds again from the start, saying why (fold_problem)
    tune.json          the rule, with the fold tokens (sha256 of each done.json) it was tuned on
                       ("inputs"), the config digest and the content fingerprint of the train
                       data whose masks it was scored against ("train_fingerprint")
    predict.json       sha256 of test_probs.npy and test_ids.txt ("files"), the fold tokens of
                       the checkpoints predicted with ("inputs"), the content fingerprint of the
                       test images ("test_fingerprint") and the recipe: everything else that
                       shapes the probabilities (TTA, checkpoint files per fold, input mode and
                       size, model; "recipe")
    fold<k>/test_predict.json  a fold's own test prediction: sha256 of fold<k>/test_probs.npy,
                       the fold token it was predicted with ("done"), the TTA, the test set's
                       fingerprint and ids; `predict` averages the file only when all of
                       these are the run's now, and predicts the fold itself otherwise
    blend.json         a blend run's members, weights and data: written first, marked
                       unfinished, and again last, finished (pipeline/blend.py); an unfinished
                       blend is refused by every stage naming its blend command
                       (check_blend_finished), `train`, `all` and `predict` refuse any blend

A kill between two writes of a stage leaves a manifest that no longer names what is beside it
(or no manifest), so readers refuse the unit and `all` makes it again; a retrained fold has a new
done.json, so every tune.json and predict.json made before it is out of date. Readers never
trust a file's modification time. A done.json, tune.json or predict.json written before the
manifests existed: done.json is still a finished fold (its files are not checked, nor its train
data when it has no "train_fingerprint": retraining costs hours), but a tune.json or
predict.json without "inputs" is out of date (both are minutes to remake: `submit` says which
command to run, `all` reruns it).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from pipeline import fileio
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.rundir import (IDS_FILE, OOF_FILES, PREDICT_FILE, PROBS_FILE, TUNE_FILE, FoldDir, RunDir, blend_command,
                             blend_members, read_blend_manifest, remake_command, train_command,
                             training_digest)

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
    or unreadable, naming the command that makes the fold (the run's train, or its blend)."""
    path = FoldDir.of(run, fold).done
    if not path.is_file():
        state = "not trained" if not path.parent.is_dir() else "not finished"
        raise PipelineError(f"{path}: missing (fold {fold} {state}) — run `{remake_command(run)}`")
    raw = path.read_bytes()  # parsed from these very bytes: the token names what was read
    try:
        done = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc}) — run `{remake_command(run)}`") from None
    if not isinstance(done, dict):
        raise PipelineError(f"{path}: not a done marker (a JSON object expected) — run `{remake_command(run)}`")
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
                                f"config than the run's config.yaml — run `{remake_command(run)}`")
        tokens[f"fold{fold}"] = token
    return tokens


def fold_file_digests(fold_dir: Path, checkpoints: list[Path]) -> dict[str, str]:
    """What a fold's done.json records: the sha256 of its OOF and of the checkpoints predicted with."""
    return file_digests(fold_dir, [*OOF_FILES, *(p.name for p in checkpoints)])


def check_fold_files(run: Path, fold: int, names, rerun: str | None = None) -> None:
    """The files `names` of the fold are those its done.json recorded (a done.json from before the
    manifests recorded nothing: accepted as it is). The default hint: `train` trains a fold whose
    files differ from its done.json again (fold_problem), a blend's command remakes it."""
    folder = FoldDir.of(run, fold)
    done, _ = read_done_token(run, fold)
    recorded = done.get("files")
    if recorded is None:
        return
    rerun = rerun or f"run `{remake_command(run)}`"
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
    from pipeline.data import fingerprint_data

    return {"inputs": finished_folds(cfg, run), "config_digest": _tune_digest(cfg),
            "train_fingerprint": fingerprint_data(cfg.data, "train")}


def check_tune_current(cfg: Config, run: Path, tuned: dict) -> None:
    """tune.json was made from the folds as they are now, with this config (PipelineError if not)."""
    path = run / TUNE_FILE
    rerun = f"run `python -m pipeline tune --run {run}`"
    _check_recorded_folds(path, tuned.get("inputs"), finished_folds(cfg, run),
                          "the fold results it was tuned on", "tuned on other fold results than the run's", rerun)
    if tuned.get("config_digest") != _tune_digest(cfg):
        raise PipelineError(f"{path}: tuned with another config than the run's config.yaml — {rerun}")
    from pipeline.data import fingerprint_data

    if tuned.get("train_fingerprint") != fingerprint_data(cfg.data, "train"):
        raise PipelineError(f"{path}: tuned against other train masks than those in {cfg.data} now "
                            f"(their bytes differ) — {rerun}")


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


def check_predictions_current(cfg: Config, run: Path, meta: dict, data: str | os.PathLike | None = None) -> None:
    """predict.json was made with the fold checkpoints the run holds now and, when `data` is
    given, of the test images in `data` as they are now, byte for byte (PipelineError if not)."""
    from pipeline.data import fingerprint_data

    rerun = f"run `python -m pipeline predict --run {run}" + (f" --data {data}`" if data is not None else "`")
    path = run / PREDICT_FILE
    _check_recorded_folds(path, meta.get("inputs"), finished_folds(cfg, run),
                          "the folds it predicted with", "predicted with other fold checkpoints than the run's", rerun)
    if data is not None and meta.get("test_fingerprint") != fingerprint_data(data, "test"):
        raise PipelineError(f"{path}: predicted other test images than those in {data} now "
                            f"(their bytes differ) — {rerun}")


def predict_recipe(cfg: Config, tta: list[str]) -> dict[str, Any]:
    """Everything besides the fold results and the test images that shapes test_probs.npy."""
    def checkpoints(fold: int) -> list[str]:  # as checkpoints.fold_checkpoints picks them (their bytes: "inputs")
        snapshots = FoldDir.of(cfg, fold).snapshots() if cfg.train.snapshots else []
        return [p.name for p in snapshots] or ["best.pt"]

    return {"tta": list(tta), "checkpoints": {f"fold{k}": checkpoints(k) for k in cfg.fold_list()},
            "input": {"mode": cfg.input.mode, "size": cfg.input.size},
            "model": hashlib.sha256(json.dumps(cfg.to_dict()["model"], sort_keys=True).encode()).hexdigest()[:16]}


def predictions_are_current(cfg: Config, run: Path, data: str) -> bool:
    """A whole prediction of the test set in `data` as it is now (same bytes), made the way the
    run's config says now (its recipe: TTA, checkpoints, input, model)."""
    try:
        meta = read_predict_meta(run)
        check_predictions_current(cfg, run, meta, data)
        return meta.get("recipe") == predict_recipe(cfg, cfg.predict.tta)
    except PipelineError:
        return False


# ---------------------------------------------------------------- a fold's own test prediction


def ids_digest(ids: list[str]) -> str:
    """sha256 of the ids as test_ids.txt holds them: which images, in which order."""
    return hashlib.sha256(("\n".join(ids) + "\n").encode()).hexdigest()


def split_digest(val_ids) -> str:
    """Which split of the train set a fold is trained on: the sha256 (ids_digest) of its
    validation ids, sorted (its training images are the others; oof_ids.txt names the same ids,
    check_trained_split compares them with the folds file). A fold's resume checkpoint records
    it beside the train data's fingerprint (fold_training_data)."""
    return ids_digest(sorted(val_ids))


def fold_training_data(cfg: Config, val_ids) -> dict[str, str]:
    """What a fold trains on besides its config, as its resume checkpoint (last.pt) records it:
    the train data's content fingerprint (as done.json's "train_fingerprint"; hashed once per
    process) and its split (split_digest). train_fold resumes only a checkpoint made on these."""
    from pipeline.data import fingerprint_data

    return {"train_fingerprint": fingerprint_data(cfg.data, "train"), "split_digest": split_digest(val_ids)}


def write_fold_predictions(run: Path, fold: int, probs, meta: dict[str, Any]) -> None:
    """fold<k>/test_probs.npy, then test_predict.json naming it by digest with `meta` (what it was
    predicted from: fold_prediction_key's fields), written last; the old manifest goes first."""
    folder = FoldDir.of(run, fold)
    folder.test_predict.unlink(missing_ok=True)
    fileio.write_npy(folder.test_probs, probs)
    fileio.write_json(folder.test_predict, {**meta, "files": file_digests(folder.path, (PROBS_FILE,))})


def read_current_fold_predictions(run: Path, fold: int, key: dict[str, Any], n_images: int) -> Path | None:
    """The fold's test_probs.npy (float16 [n_images,101,101]) when its test_predict.json records
    exactly `key` (done token, TTA, test fingerprint, ids) and names that file by digest; else
    None: the caller predicts the fold itself. Only the header is read (the caller streams it)."""
    folder = FoldDir.of(run, fold)
    if not folder.test_predict.is_file():
        return None
    try:
        meta = fileio.read_json(folder.test_predict)
        if not isinstance(meta, dict) or any(meta.get(name) != value for name, value in key.items()):
            return None
        check_files(folder.path, meta.get("files"), folder.test_predict, "predicting the fold again")
        shape, dtype = fileio.read_npy_shape(folder.test_probs)
    except PipelineError:
        return None
    if shape != (n_images, 101, 101) or dtype.name != "float16":
        return None
    return folder.test_probs


def fold_problem(cfg: Config, fold: int) -> str | None:
    """Why a fold that has a done.json is not done ("runs/R/fold1/best.pt: missing, ..."), or None when
    it is done or has no done.json (not finished: `train` resumes it, unless its last.pt was made
    on other train data or another split: train_fold.made_on_other_data). Such a fold is trained
    again from the start: its files as finished, byte for byte (a damaged oof.npy, a removed
    best.pt), the config's training digest and the train data's content (its masks) are what
    done.json recorded, or nothing it made can be trusted to be the fold's. A done.json from
    before it named its files needs only its OOF; one from before it recorded the train data
    (no "train_fingerprint") is not compared (both: retraining costs hours)."""
    from pipeline.data import fingerprint_data

    folder = FoldDir.of(cfg, fold)
    if not folder.done.exists():
        return None
    try:
        done = fileio.read_json(folder.done)
    except PipelineError as exc:
        return str(exc)
    if done.get("config_digest") != training_digest(cfg):
        return f"{folder.done}: trained with another config"
    recorded = done.get("files")
    if recorded is None:
        if not folder.oof.exists():
            return f"{folder.oof}: missing"
    elif not isinstance(recorded, dict):
        return f"{folder.done}: 'files' is not a mapping"
    else:
        for name, digest in recorded.items():
            path = folder.path / str(name)
            if not path.is_file():
                return f"{path}: missing, done.json names it"
            try:
                if sha256_file(path) != digest:
                    return f"{path}: not the file done.json names (damaged, or changed since)"
            except OSError as exc:
                return f"{path}: unreadable ({exc.strerror or exc})"
    recorded_data = done.get("train_fingerprint")
    if recorded_data is not None and recorded_data != fingerprint_data(cfg.data, "train"):
        return (f"{folder.done}: trained on other train images or masks than those in {cfg.data} now "
                "(their bytes differ)")
    return None


def fold_is_done(cfg: Config, fold: int) -> bool:
    """The fold finished with this config and train data, and its files are as done.json recorded."""
    return FoldDir.of(cfg, fold).done.exists() and fold_problem(cfg, fold) is None


# ---------------------------------------------------------------- the folds a run was trained on


def check_trained_split(cfg: Config, run: Path, fold_ids: dict[int, list[str]]) -> None:
    """Each fold's OOF ids (`fold_ids`) are exactly that fold's ids in the folds file the run reads
    now: a changed folds file would mix two splits in one run (a fold trained on images another
    fold validates on) and in its OOF. The fix named: train every fold again on the file as it is
    now (`train --force`), unless the file the run was trained with is put back."""
    from pipeline.folds import load_folds

    folds_path = cfg.folds_path()
    if not fold_ids:
        return
    if not folds_path.exists():
        # A run copied from elsewhere (e.g. a Kaggle kernel) may come without its folds file;
        # the duplicate check still holds and load_train rejects ids that are not train images.
        print(f"warning: {folds_path}: not found, OOF ids are not checked against the folds file",
              file=sys.stderr)
        return
    folds = load_folds(folds_path)
    fold_of = dict(zip(folds["id"].astype(str), folds["fold"].astype(int)))
    for fold, ids in fold_ids.items():
        where = FoldDir.of(run, fold).oof_ids
        unknown = [i for i in ids if i not in fold_of]
        wrong = [i for i in ids if i in fold_of and fold_of[i] != fold]
        lacking = sorted({i for i, k in fold_of.items() if k == fold} - set(ids))
        if unknown:
            problem = f"{len(unknown)} ids not in {folds_path} (e.g. {unknown[0]})"
        elif wrong:
            problem = (f"{len(wrong)} ids belong to another fold in {folds_path} "
                       f"(e.g. {wrong[0]} is in fold {fold_of[wrong[0]]})")
        elif lacking:
            problem = f"lacks {len(lacking)} of fold {fold}'s ids in {folds_path} (e.g. {lacking[0]})"
        else:
            continue
        raise PipelineError(f"{where}: {problem}: the folds file changed since fold {fold} was trained — "
                            f"{split_fix(run, folds_path)}")


def split_fix(run: Path, folds_path: Path) -> str:
    """The hint of a run trained on another split than its folds file holds now."""
    restore = f"or put back the {folds_path} it was trained with"
    blend = read_blend_manifest(run)
    if blend is not None:  # its members were trained on the old split: they are what to train again
        members = dict.fromkeys(blend_members(blend))
        retrain = ", ".join(f"`{train_command(member, '--force')}`" for member in members) or "each with --force"
        return f"train its members again ({retrain}), then run `{blend_command(run, blend)}`, {restore}"
    return f"train every fold again on it with `{train_command(run, '--force')}`, {restore}"


def read_trained_split(run: Path, folds: list[int]) -> dict[int, list[str]]:
    """fold -> its OOF ids (oof_ids.txt), of the folds in `folds` that have them."""
    out = {}
    for fold in folds:
        path = FoldDir.of(run, fold).oof_ids
        if path.is_file():
            out[fold] = fileio.read_text(path).split()
    return out


# ---------------------------------------------------------------- blend runs


def refuse_blend_run(run: Path) -> None:
    """A blend's folds and test probabilities are its members', mixed by `blend`: `train`,
    `all` and `predict` have nothing to make there. One line naming the blend command."""
    blend = read_blend_manifest(run)
    if blend is not None:
        raise PipelineError(f"{run}: is a blend of other runs (blend.json): its folds and test probabilities are "
                            f"made by `blend`, not trained or predicted — run `{blend_command(run, blend)}`")


def check_blend_finished(run: Path) -> None:
    """A blend killed before it finished (its blend.json, written first, still says unfinished):
    one line naming the blend command that finishes it, before any half-written file is read."""
    blend = read_blend_manifest(run)
    if blend is not None and blend.get("finished") is False:
        raise PipelineError(f"{RunDir(run).blend}: the blend was interrupted before it finished — "
                            f"run `{blend_command(run, blend)}`")
