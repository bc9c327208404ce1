"""Test inference: every fold's best model, each with TTA, averaged at 101x101.

`predict_run` writes `runs/<name>/test_probs.npy` (float16 [N,101,101]), `test_ids.txt`
and, last, `predict.json` naming both by digest and the fold results predicted with, so the
three are one unit (pipeline/manifests.py). Probabilities, not masks, are saved so that runs can
be blended later and thresholds changed without running the models again.

A fold's prediction is float16, as `predict_fold_test` stores it: the fold's own process (under
`all`, on its own GPU) predicts the test set as it finishes, and `predict_run` averages those
files when they are current (same done.json, TTA and test set) and predicts any other fold
itself. Both ways sum the same float16 arrays in fold order, so test_probs.npy is the same.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import fileio
from pipeline.config import TTA_FLIPS, VALID_TTA, Config
from pipeline.errors import PipelineError
from pipeline.rundir import RunDir, load_run_config
from pipeline.runtime import Runtime, resolve_runtime


@torch.inference_mode()  # no autograd bookkeeping at all (cheaper than no_grad on the CPU)
def predict_probs(model, images: np.ndarray, cfg: Config, rt: Runtime,
                  tta: tuple[str, ...] | list[str] = ("none",), bar=None, *,
                  out: np.ndarray | None = None, weight: float = 1.0) -> np.ndarray:
    """Probabilities at 101x101 (float32 [N,101,101]); TTA flips are undone before averaging.

    With `out` (float32 or float16 [N,101,101]) the probabilities, times `weight`, are added into it batch
    by batch and `out` is returned: folds and snapshots then average into one buffer instead
    of each returning a full copy (18,000 test images are 734 MB a copy). `bar` moves by one
    per image and TTA pass, so it advances within a fold. Batches are cfg.predict.batch_size."""
    from pipeline.geometry import restore, to_batch

    model.eval()
    batch_size = cfg.predict.batch_size
    accumulate = out is not None
    if out is None:
        out = np.empty(images.shape, dtype=np.float32)
    for start in range(0, len(images), batch_size):
        x, _ = to_batch(torch.from_numpy(images[start:start + batch_size]), None, cfg, rt)
        probs = torch.zeros((x.shape[0], 1, x.shape[2], x.shape[3]), device=rt.device)
        for flip in tta:
            dims = TTA_FLIPS[flip]  # each flip is its own inverse: the same dims undo it
            with rt.autocast():
                logits = model(torch.flip(x, dims) if dims else x)["mask"]
            logits = logits.float()
            probs += torch.sigmoid(torch.flip(logits, dims) if dims else logits)
            if bar is not None:
                bar.update(len(x))
        probs /= len(tta)
        batch = restore(probs, cfg.input.mode)[:, 0].cpu().numpy()
        if accumulate:
            if weight != 1.0:
                batch *= weight
            out[start:start + len(x)] += batch
        else:
            out[start:start + len(x)] = batch
    return out


def load_fold_models(cfg: Config, fold: int, rt: Runtime) -> list[torch.nn.Module]:
    """The fold's model(s), built from the run's own config, in eval mode."""
    from pipeline.checkpoints import fold_checkpoints, load_checkpoint
    from pipeline.models import create_model

    models = []
    for path in fold_checkpoints(cfg, fold):
        model = create_model(cfg.model, load_pretrained=False)  # the checkpoint holds every weight
        model.load_state_dict(load_checkpoint(path)["model"])
        models.append(model.to(rt.device, memory_format=rt.memory_format()).eval())
    return models


def fold_probs(cfg: Config, fold: int, images: np.ndarray, rt: Runtime, tta: tuple[str, ...] | list[str],
               bar=None) -> np.ndarray:
    """float32 [N,101,101]: fold `fold`'s prediction, the mean of its checkpoints' TTA
    probabilities: the fold's final OOF (train_fold.write_final_oof) and the teacher of a
    pseudo-label run (pseudo.predict_teacher_fold). The test set's is `fold_prediction_chunks`,
    the same mean kept in float16 as test_probs.npy keeps it."""
    models = load_fold_models(cfg, fold, rt)
    total = np.zeros(images.shape, dtype=np.float32)
    for model in models:
        predict_probs(model, images, cfg, rt, tta, bar, out=total, weight=1.0 / len(models))
    return total


# Test images a fold predicts per piece: whole batches (so a piece's batches are the batches of
# a prediction made in one go), 16 of them: a piece's float16 share is ~10 MB at batch 64.
PIECE_BATCHES = 16


def fold_prediction_chunks(cfg: Config, fold: int, images: np.ndarray, rt: Runtime,
                           tta: tuple[str, ...] | list[str], bar=None):
    """(start, float16 [n,101,101]) pieces of a fold's test prediction: the mean of its
    checkpoints' TTA probabilities, each checkpoint's share added in float16. The one arithmetic
    of a fold's test prediction, whether its fold process stores it (predict_fold_test) or
    predict computes it, so the two give the same bits."""
    models = load_fold_models(cfg, fold, rt)
    size = cfg.predict.batch_size * PIECE_BATCHES
    for start in range(0, len(images), size):
        piece = np.zeros((min(size, len(images) - start), *images.shape[1:]), dtype=np.float16)
        for model in models:
            predict_probs(model, images[start:start + size], cfg, rt, tta, bar, out=piece, weight=1.0 / len(models))
        yield start, piece


def count_passes(cfg: Config, folds: list[int], n_images: int, tta: list[str]) -> int:
    """Images x TTA passes over every fold's checkpoints: what predict's progress bar counts."""
    from pipeline.checkpoints import fold_checkpoints

    return n_images * len(tta) * sum(len(fold_checkpoints(cfg, fold)) for fold in folds)


def add_weighted(total: np.ndarray, part: np.ndarray, weight: float, rows: int = 64) -> None:
    """total += part * weight in place, in float32 and rounded to total's dtype once, `rows`
    images at a time (two float32 temporaries of 2.6 MB)."""
    for i in range(0, len(part), rows):
        acc = total[i:i + rows].astype(np.float32)
        acc += np.multiply(part[i:i + rows], weight, dtype=np.float32)
        total[i:i + rows] = acc


def count_not_finite(probs: np.ndarray, chunk: int = 1024) -> int:
    """Images with a NaN or infinite probability, checked a chunk at a time (no full-size mask)."""
    return sum(int((~np.isfinite(probs[i:i + chunk])).any(axis=(1, 2)).sum()) for i in range(0, len(probs), chunk))


def fold_prediction(cfg: Config, fold: int, images: np.ndarray, rt: Runtime, tta: tuple[str, ...] | list[str],
                    bar=None) -> np.ndarray:
    """float16 [N,101,101]: a fold's whole test prediction, as its fold process stores it."""
    out = np.empty(images.shape, dtype=np.float16)
    for start, piece in fold_prediction_chunks(cfg, fold, images, rt, tta, bar):
        out[start:start + len(piece)] = piece
    return out


def predict_fold_test(cfg: Config, fold: int, rt: Runtime, data_dir: str | None = None) -> Path:
    """Fold `fold`'s test prediction into fold<k>/test_probs.npy and its manifest
    test_predict.json (pipeline/manifests.py), run in the fold's own process right after it
    finished training; `predict_run` then only averages. Returns the .npy's path."""
    from pipeline.data import fingerprint_test_images, load_test
    from pipeline.manifests import read_done_token, write_fold_predictions
    from pipeline.rundir import FoldDir

    data = data_dir or cfg.data
    flips = list(cfg.predict.tta)
    fingerprint = fingerprint_test_images(data)  # taken before reading, as predict_run does
    test = load_test(data)
    if len(test.ids) == 0:
        raise PipelineError(f"{Path(data) / 'test' / 'images'}: no test images")
    started = time.perf_counter()
    probs = fold_prediction(cfg, fold, test.images, rt, flips)
    folder = FoldDir.of(cfg, fold)
    if not np.isfinite(probs).all():
        raise PipelineError(f"{folder.test_probs}: not written, fold {fold} predicts NaN or infinite probabilities")
    _, token = read_done_token(cfg.run_dir, fold)
    seconds = time.perf_counter() - started
    write_fold_predictions(cfg.run_dir, fold, probs, {
        **fold_prediction_key(token, flips, fingerprint, test.ids), "data": str(data),
        "seconds": round(seconds, 1), "device": rt.describe()})
    print(f"fold {fold}: predicted {len(test.ids)} test images x {len(flips)} TTA in {seconds:.1f}s "
          f"-> {folder.test_probs}", flush=True)
    return folder.test_probs


def fold_prediction_key(done_token: str, tta: list[str], fingerprint: str, ids: list[str]) -> dict:
    """What a fold's stored test prediction must have been made from to be averaged as it is."""
    from pipeline.manifests import ids_digest

    return {"done": done_token, "tta": list(tta), "test_fingerprint": fingerprint, "ids": ids_digest(ids)}


def note_test_ids_in_train(train_data: str | Path, test_data: str | Path, test_ids: list[str]) -> None:
    """One note when test images share ids with the images the run trained on (`train_data`)."""
    from pipeline.data import ids_also_in_train

    shared = ids_also_in_train(train_data, test_ids)
    if shared:
        print(f"note: {len(shared)} of the {len(test_ids)} test images in {Path(test_data) / 'test' / 'images'} "
              f"have an id also in {Path(train_data) / 'train' / 'images'} (e.g. {shared[0]})", file=sys.stderr)


def parse_tta(text: str | None, default: list[str]) -> list[str]:
    if text is None:
        return list(default)
    names = [part.strip() for part in text.split(",") if part.strip()]
    bad = [n for n in names if n not in VALID_TTA]
    if bad or not names:
        raise PipelineError(f"--tta {text!r}: choose a comma list from {sorted(VALID_TTA)}")
    return names


def finished_inputs(cfg: Config, run: Path) -> dict[str, str]:
    """The run's folds as predict.json records them ({"fold<k>": done.json token}), each finished
    and holding the checkpoints its done.json recorded: a fold killed in a `train --force` has a
    best.pt of one epoch that must never reach a submission."""
    from pipeline.checkpoints import fold_checkpoints
    from pipeline.manifests import check_fold_files, finished_folds

    inputs = finished_folds(cfg, run)
    for fold in cfg.fold_list():
        check_fold_files(run, fold, [path.name for path in fold_checkpoints(cfg, fold)])
    return inputs


def predict_run(run_dir: str | Path, *, data_dir: str | None = None, tta: str | None = None,
                device: str | None = None) -> Path:
    """Average every fold's TTA probabilities over the test images; returns test_probs.npy's path.
    A fold whose own current prediction is stored (predict_fold_test) is read, not predicted."""
    from tqdm import tqdm

    from pipeline.data import fingerprint_test_images, load_test
    from pipeline.manifests import predict_recipe, read_current_fold_predictions, refuse_blend_run, write_predictions

    run = Path(run_dir)
    refuse_blend_run(run)  # its test probabilities are its members', mixed by `blend`
    cfg = load_run_config(run)
    flips = parse_tta(tta, cfg.predict.tta)
    folds = cfg.fold_list()
    inputs = finished_inputs(cfg, run)
    # taken before reading: a test set changed while predicting then looks stale next time
    fingerprint = fingerprint_test_images(data_dir or cfg.data)
    test = load_test(data_dir or cfg.data)
    if len(test.ids) == 0:
        raise PipelineError(f"{Path(data_dir or cfg.data) / 'test' / 'images'}: no test images")
    note_test_ids_in_train(cfg.data, data_dir or cfg.data, test.ids)
    rt = resolve_runtime(cfg.train.precision, cfg.train.channels_last, device, cfg.run.threads, cfg.run.deterministic)
    started = time.perf_counter()
    # One buffer, in the float16 that test_probs.npy keeps: each fold adds its share (1/folds)
    # into it a piece at a time, whether the fold is predicted here or its stored prediction is
    # streamed from disk, so nothing holds a second copy of the test set's probabilities
    # (float32 [18000,101,101] is 734 MB; this is 367 MB). The mean is rounded to float16 once
    # per fold instead of once: within ~1.5 float16 steps (< 0.001) of the float32 mean.
    probs = np.zeros(test.images.shape, dtype=np.float16)
    passes = count_passes(cfg, folds, len(test.ids), flips)
    from_folds: list[int] = []  # folds whose own stored prediction was averaged
    with tqdm(total=passes, desc=f"predict {cfg.name} ({len(folds)} folds x {'+'.join(flips)})",
              unit="img", file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 10.0) as bar:
        for fold in folds:  # each fold weighs the same, however many snapshots it averages
            token = inputs.get(f"fold{fold}")
            stored = None if token is None else read_current_fold_predictions(
                run, fold, fold_prediction_key(token, flips, fingerprint, test.ids), len(test.ids))
            if stored is None:
                pieces = fold_prediction_chunks(cfg, fold, test.images, rt, flips, bar)
            else:
                from_folds.append(fold)
                pieces = fileio.iter_npy_rows(stored, cfg.predict.batch_size * PIECE_BATCHES)
            for start, piece in pieces:
                add_weighted(probs[start:start + len(piece)], piece, 1.0 / len(folds))
            if stored is not None:
                bar.update(count_passes(cfg, [fold], len(test.ids), flips))
    bad = count_not_finite(probs)
    if bad:
        raise PipelineError(f"{RunDir(run).probs}: not written, the models predict NaN or infinite "
                            f"probabilities for {bad} test images")
    seconds = time.perf_counter() - started
    # one unit: predict.json, written last, names the other two by digest (see pipeline/manifests.py)
    write_predictions(run, test.ids, probs, {
        "tta": flips, "folds": folds, "n_images": len(test.ids), "seconds": round(seconds, 1),
        "data": str(data_dir or cfg.data), "test_fingerprint": fingerprint, "device": rt.describe(),
        "inputs": inputs, "recipe": predict_recipe(cfg, flips), "from_fold_files": from_folds,
    })
    stored = f" ({len(from_folds)} read from the folds' own predictions)" if from_folds else ""
    print(f"predicted {len(test.ids)} test images with {len(folds)} folds x {len(flips)} TTA{stored} "
          f"in {seconds:.1f}s -> {RunDir(run).probs}")
    return RunDir(run).probs
