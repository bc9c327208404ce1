"""Pseudo-labels: test images labelled by a finished run (the teacher) join a fold's training set.

The 1st place TGS solution measured +0.010 from them. Set `pseudo.teacher: runs/<name>` (a run
that is trained and tuned); fold k of this run then also trains on the test images that the
teacher's fold-k model labels confidently.

Why the same fold's model, not the teacher's fold-averaged test prediction: the teacher's fold-k
model never trained on fold k's validation images, so neither does anything this fold learns
from its labels, and the CV stays an honest out-of-fold score. The averaged prediction carries
every train image into every fold. `teacher_for_fold` refuses a teacher whose fold k trained on
any of this fold's validation images (another split).

The labels are what the teacher would submit (its tuned threshold, empty threshold, min area and
blank rule); an image is kept only when at most `pseudo.max_uncertain_share` of its pixels
have a teacher probability inside UNCERTAIN_BAND. Empty and salt images are kept alike. The
labels are cached per fold (`fold<k>/pseudo.npz`, FoldDir.pseudo, keyed by the training digest), so a resumed
fold does not predict again; a fold started afresh labels again and overwrites the cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline import fileio
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.postprocess import PostProcess, read_tuned
from pipeline.rundir import FoldDir, RunDir, load_run_config

UNCERTAIN_BAND = (0.2, 0.8)  # a teacher probability strictly inside it is not a confident label


def uncertain_share(probs: np.ndarray, band: tuple[float, float] = UNCERTAIN_BAND) -> np.ndarray:
    """float64 [N]: the share of each image's pixels whose probability lies strictly inside band."""
    low, high = band
    inside = (probs > low) & (probs < high)
    return inside.reshape(len(probs), -1).mean(axis=1)


def select_confident(probs: np.ndarray, max_share: float) -> np.ndarray:
    """bool [N]: the images with at most max_share of their pixels uncertain."""
    return uncertain_share(probs) <= max_share


def teacher_for_fold(cfg: Config, fold: int, val_ids: Sequence[str]) -> tuple[Config, PostProcess]:
    """The teacher run's config and tuned post-processing (its labels are the masks it would
    submit), after checking it can label this fold without leaking."""
    run = Path(cfg.pseudo.teacher)
    where = f"pseudo.teacher {run}"
    if not RunDir(run).config.is_file():
        raise PipelineError(f"{where}: not a run dir (no config.yaml); train and tune the teacher first")
    teacher = load_run_config(run)
    ids_path = FoldDir.of(run, fold).oof_ids
    if not ids_path.is_file():
        raise PipelineError(f"{ids_path}: missing — the teacher has no trained fold {fold} to label this fold's "
                            f"pseudo-labels (train it with the same n_folds and folds file)")
    from pipeline.fileio import read_text

    teacher_val = set(read_text(ids_path).split())
    leaked = [i for i in val_ids if i not in teacher_val]
    if leaked:
        raise PipelineError(f"{where}: its fold {fold} model trained on {len(leaked)} of this fold's validation "
                            f"images (e.g. {leaked[0]}): the runs use different folds, and its labels would "
                            f"leak them into training")
    # the teacher's labels are the masks it would submit: its fold finished, its checkpoints those
    # its done.json recorded, its tune.json made from its folds as they are now (pipeline/manifests.py)
    from pipeline.fileio import read_json
    from pipeline.checkpoints import fold_checkpoints
    from pipeline.manifests import check_fold_files, check_tune_current

    post = read_tuned(run)
    check_tune_current(teacher, run, read_json(RunDir(run).tune))
    check_fold_files(run, fold, [path.name for path in fold_checkpoints(teacher, fold)])
    return teacher, post


def predict_teacher_fold(teacher: Config, fold: int, images: np.ndarray, rt) -> np.ndarray:
    """float32 [N,101,101]: the teacher's fold-k model(s), with the teacher's own TTA."""
    from pipeline.predict import fold_probs

    return fold_probs(teacher, fold, images, rt, teacher.predict.tta)


def pseudo_labels(cfg: Config, fold: int, val_ids: Sequence[str], rt, digest: str, *, use_cache: bool = True,
                  write_cache: bool = True, say: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [M,101,101], bool masks [M,101,101]): the confident test images of the
    teacher's fold `fold`, read from the fold's cache when use_cache and it was made for this
    training digest."""
    from pipeline.data import is_blank, load_test

    cache = FoldDir.of(cfg, fold).pseudo
    test = load_test(cfg.data)
    if len(test.ids) == 0:
        raise PipelineError(f"{Path(cfg.data) / 'test' / 'images'}: no test images to pseudo-label")
    index = {image_id: i for i, image_id in enumerate(test.ids)}
    cached = read_cache(cache, digest, index) if use_cache else None
    if cached is not None:
        ids, masks = cached
        return test.images[[index[i] for i in ids]], masks

    teacher, post = teacher_for_fold(cfg, fold, val_ids)
    probs = predict_teacher_fold(teacher, fold, test.images, rt)
    keep = select_confident(probs, cfg.pseudo.max_uncertain_share)
    masks = post.apply(probs[keep], blank=is_blank(test.images[keep]))
    n_salt = int(masks.reshape(len(masks), -1).any(axis=1).sum())
    say(f"fold {fold}: {int(keep.sum())} of {len(test.ids)} test images pseudo-labelled by "
        f"{cfg.pseudo.teacher} fold {fold} ({n_salt} with salt; at most {cfg.pseudo.max_uncertain_share:.3f} "
        f"of their pixels between {UNCERTAIN_BAND[0]} and {UNCERTAIN_BAND[1]})")
    if write_cache:
        ids = np.asarray([test.ids[i] for i in np.flatnonzero(keep)], dtype=str)
        fileio.write_with(cache, lambda f: np.savez(f, ids=ids, masks=masks, digest=np.asarray(digest)))
    return test.images[keep], masks


def read_cache(cache: Path, digest: str, test_index: dict[str, int]) -> tuple[list[str], np.ndarray] | None:
    """(ids, masks) from a fold's cache made for this training digest; None when there is none."""
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as saved:
            if str(saved["digest"]) != digest:
                return None  # labelled for another config: label again
            ids, masks = [str(i) for i in saved["ids"]], saved["masks"].astype(bool)
    except (OSError, ValueError, KeyError) as exc:
        raise PipelineError(f"{cache}: unreadable pseudo-label cache ({exc}); delete it to label again") from None
    if masks.shape != (len(ids), 101, 101):
        raise PipelineError(f"{cache}: {len(ids)} ids but masks of shape {masks.shape}; delete it to label again")
    missing = [i for i in ids if i not in test_index]
    if missing:
        raise PipelineError(f"{cache}: holds test image {missing[0]}, which the data's test images lack; "
                            f"delete it to label again")
    return ids, masks
