"""Test inference: every fold's best model, each with TTA, averaged at 101x101.

`predict_run` writes `runs/<name>/test_probs.npy` (float16 [N,101,101]), `test_ids.txt`
and, last, `predict.json` naming both by digest and the fold results predicted with, so the
three are one unit (pipeline/manifests.py). Probabilities, not masks, are saved so that runs can
be blended later and thresholds changed without running the models again.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import VALID_TTA, Config
from pipeline.errors import PipelineError
from pipeline.rundir import RunDir, load_run_config
from pipeline.runtime import Runtime, resolve_runtime

# Flip dims of an NCHW tensor; each flip is its own inverse, so the same dims undo it.
FLIP_DIMS = {"none": (), "hflip": (3,), "vflip": (2,), "hvflip": (2, 3)}


@torch.no_grad()
def predict_probs(model, images: np.ndarray, cfg: Config, rt: Runtime, batch_size: int,
                  tta: tuple[str, ...] | list[str] = ("none",), bar=None) -> np.ndarray:
    """Probabilities at 101x101 (float32 [N,101,101]); TTA flips are undone before averaging."""
    from pipeline.geometry import restore, to_batch

    model.eval()
    out = np.empty(images.shape, dtype=np.float32)
    for start in range(0, len(images), batch_size):
        x, _ = to_batch(torch.from_numpy(images[start:start + batch_size]), None, cfg, rt)
        probs = torch.zeros((x.shape[0], 1, x.shape[2], x.shape[3]), device=rt.device)
        for flip in tta:
            dims = FLIP_DIMS[flip]
            with rt.autocast():
                logits = model(torch.flip(x, dims) if dims else x)["mask"]
            logits = logits.float()
            probs += torch.sigmoid(torch.flip(logits, dims) if dims else logits)
        probs /= len(tta)
        out[start:start + len(x)] = restore(probs, cfg.input.mode)[:, 0].cpu().numpy()
        if bar is not None:
            bar.update(len(x))
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
    probabilities. The one definition of "what a fold predicts", shared by the test set
    (predict_run), the fold's final OOF (train.write_final_oof) and the teacher of a
    pseudo-label run (pseudo.predict_teacher_fold), so the three can never drift apart."""
    models = load_fold_models(cfg, fold, rt)
    total = np.zeros(images.shape, dtype=np.float32)
    for model in models:
        total += predict_probs(model, images, cfg, rt, cfg.predict.batch_size, tta)
    if bar is not None:
        bar.update(len(images))
    return total / len(models)


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
    """Average every fold's TTA probabilities over the test images; returns test_probs.npy's path."""
    from tqdm import tqdm

    from pipeline.data import fingerprint_test_images, load_test
    from pipeline.manifests import write_predictions

    run = Path(run_dir)
    cfg = load_run_config(run)
    flips = parse_tta(tta, cfg.predict.tta)
    folds = cfg.fold_list()
    inputs = finished_inputs(cfg, run)
    # taken before reading: a test set changed while predicting then looks stale next time
    fingerprint = fingerprint_test_images(data_dir or cfg.data)
    test = load_test(data_dir or cfg.data)
    if len(test.ids) == 0:
        raise PipelineError(f"{Path(data_dir or cfg.data) / 'test' / 'images'}: no test images")
    rt = resolve_runtime(cfg.train.precision, cfg.train.channels_last, device, cfg.run.threads, cfg.run.deterministic)
    started = time.perf_counter()
    total = np.zeros(test.images.shape, dtype=np.float32)
    with tqdm(total=len(folds) * len(test.ids), desc=f"predict {cfg.name} ({len(folds)} folds x {flips})",
              unit="img", file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 10.0) as bar:
        for fold in folds:  # each fold weighs the same, however many snapshots it averages
            total += fold_probs(cfg, fold, test.images, rt, flips, bar)
    probs = (total / len(folds)).astype(np.float16)
    if not np.isfinite(probs).all():
        raise PipelineError(f"{RunDir(run).probs}: not written, the models predict NaN or infinite "
                            f"probabilities for {int((~np.isfinite(probs)).any(axis=(1, 2)).sum())} test images")
    seconds = time.perf_counter() - started
    # one unit: predict.json, written last, names the other two by digest (see pipeline/manifests.py)
    write_predictions(run, test.ids, probs, {
        "tta": flips, "folds": folds, "n_images": len(test.ids), "seconds": round(seconds, 1),
        "data": str(data_dir or cfg.data), "test_fingerprint": fingerprint, "device": rt.describe(),
        "inputs": inputs,
    })
    print(f"predicted {len(test.ids)} test images with {len(folds)} folds x {len(flips)} TTA "
          f"in {seconds:.1f}s -> {RunDir(run).probs}")
    return RunDir(run).probs
