"""Tuning: the post-processing chosen on the out-of-fold predictions (threshold, empty
threshold, min area, blank images; the rule itself is pipeline/postprocess.py).

Thresholding is a separate command on saved probabilities (as in lopuhin's imet): training
saves every fold's validation probabilities (`fold<k>/oof.npy`), `tune_run` puts them
together into one OOF covering the train set, searches the threshold x empty-threshold x
min-area grid with the competition metric, and writes `runs/<name>/tune.json` (read by
`submit`) and `runs/<name>/oof.csv` (the tuned OOF masks, scoreable with `python -m pipeline score`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.postprocess import DEFAULT_MIN_AREA, DEFAULT_THRESHOLD, PostProcess, binarize, write_tuned
from pipeline.manifests import check_blend_finished, check_fold_files, check_trained_split
from pipeline.rundir import LEADERBOARD_CSV, OOF_FILES, FoldDir, RunDir, load_run_config, remake_command

IMAGE_SHAPE = (101, 101)


# ---------------------------------------------------------------- OOF assembly


def read_fold_oof(run_dir: str | Path, fold: int, *, require_done: bool = True) -> tuple[list[str], np.ndarray]:
    """One fold's validation ids and float32 [n,101,101] probabilities (complete folds only,
    unless require_done=False: a fold still training has the OOF of its best epoch so far)."""
    from pipeline.fileio import read_npy, read_text

    folder = FoldDir.of(run_dir, fold)
    for path in (folder.oof, folder.oof_ids, folder.done)[: 3 if require_done else 2]:
        if not path.exists():
            state = "not trained" if not folder.path.is_dir() or path != folder.done else "not finished"
            raise PipelineError(f"{path}: missing (fold {fold} {state}) — run `{remake_command(run_dir)}`")
    if require_done:  # the OOF that done.json recorded, not one a later (killed) retrain left
        check_fold_files(Path(run_dir), fold, OOF_FILES)
    probs = read_npy(folder.oof)
    if probs.ndim != 3 or probs.shape[1:] != IMAGE_SHAPE:
        raise PipelineError(f"{folder.oof}: shape {probs.shape}, expected [n, 101, 101]")
    ids = read_text(folder.oof_ids).split()
    if len(ids) != len(probs):
        raise PipelineError(
            f"{folder.oof_ids}: {len(ids)} ids but oof.npy holds {len(probs)} images"
        )
    if not np.isfinite(probs).all():
        raise PipelineError(f"{folder.oof}: contains NaN or infinite probabilities")
    return ids, probs.astype(np.float32)


def assemble_oof(run_dir: str | Path) -> tuple[list[str], np.ndarray]:
    """All folds' OOF probabilities as one (ids sorted, float32 [N,101,101]); each id once."""
    run = Path(run_dir)
    cfg = load_run_config(run)
    fold_ids: dict[int, list[str]] = {}
    fold_probs: list[np.ndarray] = []
    for fold in cfg.fold_list():
        ids, probs = read_fold_oof(run, fold)
        fold_ids[fold] = ids
        fold_probs.append(probs)
    all_ids = [i for ids in fold_ids.values() for i in ids]
    seen: dict[str, int] = {}
    for fold, ids in fold_ids.items():
        for image_id in ids:
            if image_id in seen:
                other = seen[image_id]
                where = f"fold {other} and fold {fold}" if other != fold else f"fold {fold} twice"
                duplicates = len(all_ids) - len(set(all_ids))
                raise PipelineError(
                    f"{FoldDir.of(run, fold).oof_ids}: id {image_id} appears in {where} "
                    f"({duplicates} duplicate ids in all)"
                )
            seen[image_id] = fold
    check_trained_split(cfg, run, fold_ids)
    probs = np.concatenate(fold_probs) if fold_probs else np.zeros((0, *IMAGE_SHAPE), np.float32)
    order = np.argsort(np.asarray(all_ids, dtype=object), kind="stable")
    return [all_ids[i] for i in order], probs[order]


def oof_fold_of(run_dir: str | Path) -> dict[str, int]:
    """id -> fold, read from each fold's oof_ids.txt (for per-fold scores)."""
    run = Path(run_dir)
    out: dict[str, int] = {}
    for fold in load_run_config(run).fold_list():
        path = FoldDir.of(run, fold).oof_ids
        if path.exists():
            out.update((i, fold) for i in path.read_text(encoding="utf-8").split())
    return out


# ---------------------------------------------------------------- search


def search_grid(cfg: Config) -> tuple[list[float], list[float], list[int]]:
    """(thresholds, empty thresholds, min areas) of the config, the thresholds always including
    the untuned 0.5 and the areas 0, so tuning never loses. Each threshold t is searched with the
    empty thresholds {t} | empty thresholds: {t} is the plain min-area rule (see `search_space`)."""
    thresholds = sorted({round(float(t), 6) for t in cfg.tune.thresholds} | {DEFAULT_THRESHOLD})
    empty_thresholds = sorted({round(float(t), 6) for t in cfg.tune.empty_thresholds})
    min_areas = sorted({int(a) for a in cfg.tune.min_areas} | {DEFAULT_MIN_AREA})
    for key, values in (("thresholds", thresholds), ("empty_thresholds", empty_thresholds)):
        bad = [t for t in values if not 0.0 <= t < 1.0]
        if bad:
            raise PipelineError(f"tune.{key}: {bad[0]} is outside [0, 1)")
    if min_areas[0] < 0:
        raise PipelineError(f"tune.min_areas: {min_areas[0]} is negative")
    return thresholds, empty_thresholds, min_areas


def search_space(thresholds: list[float], empty_thresholds: list[float]) -> tuple[list[float], np.ndarray]:
    """(every empty-threshold value, searched [T, E]): the grid's empty axis is the union of both
    lists, and threshold t is searched only with itself and the configured empty thresholds,
    not with every other threshold of the grid (fewer candidates, less tuning to noise)."""
    values = sorted(set(thresholds) | set(empty_thresholds))
    configured = np.isin(values, empty_thresholds)
    searched = (np.asarray(values)[None, :] == np.asarray(thresholds)[:, None]) | configured[None, :]
    return values, searched


def best_choice(grid: np.ndarray, thresholds: list[float], empty_thresholds: list[float],
                min_areas: list[int]) -> tuple[float, float, int]:
    """(threshold, empty threshold, min area) of the grid's maximum [T, E, A] (-inf: not searched);
    among ties the one nearest the defaults (least tuned to noise): threshold nearest 0.5, then
    empty threshold nearest the threshold, then the smallest min area."""
    best = grid.max()
    ties = np.argwhere(grid >= best - 1e-12).tolist()

    def untuned_first(tea: list[int]) -> tuple:
        t, e, a = thresholds[tea[0]], empty_thresholds[tea[1]], min_areas[tea[2]]
        return abs(t - DEFAULT_THRESHOLD), abs(e - t), a, tuple(tea)

    i, j, k = min(ties, key=untuned_first)
    return thresholds[i], empty_thresholds[j], min_areas[k]


def _group_scores(image_scores: np.ndarray, groups: np.ndarray) -> dict[str, dict[str, Any]]:
    """{group: n, mean score, cv_lost}; cv_lost = what the group's imperfect images cost the
    whole CV, (1 - score) x n / N: where to look for points, unlike the class score alone."""
    total = max(len(image_scores), 1)
    return {
        str(int(g)): {"n": int((groups == g).sum()), "score": round(float(image_scores[groups == g].mean()), 6),
                      "cv_lost": round(float((1.0 - image_scores[groups == g]).sum() / total), 6)}
        for g in np.unique(groups)
    }


def empty_decision_report(truth: np.ndarray, masks: np.ndarray, image_scores: np.ndarray,
                          threshold_masks: np.ndarray) -> dict[str, Any]:
    """How much of the CV the empty / non-empty decision costs, for bool truth and final masks
    [N,H,W], their per-image scores [N] and the plain `probs > threshold` masks.

    salt_called_empty: salt images submitted empty (each scores 0); empty_called_salt: empty
    images given a mask (each scores 0). cv_empty_oracle: the CV if every one of those
    decisions were right, the salt images keeping their threshold mask: the most any "is there
    salt?" rule (min area, a classifier) could give this model."""
    from pipeline.metric import image_scores as score_images

    salt = truth.reshape(len(truth), -1).any(axis=1)
    predicted = masks.reshape(len(masks), -1).any(axis=1)
    total = max(len(truth), 1)
    oracle = np.where(salt, image_scores, 1.0)
    missed = salt & ~predicted
    if missed.any():
        oracle[missed] = score_images(truth[missed], threshold_masks[missed])
    return {
        "salt_called_empty": int(missed.sum()),
        "empty_called_salt": int((~salt & predicted).sum()),
        "n_salt": int(salt.sum()),
        "n_empty": int((~salt).sum()),
        "cv_lost_salt_called_empty": round(float(missed.sum() / total), 6),
        "cv_lost_empty_called_salt": round(float((~salt & predicted).sum() / total), 6),
        "cv_empty_oracle": round(float(oracle.mean()) if len(oracle) else 0.0, 6),
    }


def tune_oof(truth: np.ndarray, probs: np.ndarray, blank: np.ndarray, cfg: Config) -> dict[str, Any]:
    """Search the grid and decide on blank images; the scores come from the final masks themselves."""
    from pipeline.metric import image_scores, threshold_scores

    thresholds, configured_empty, min_areas = search_grid(cfg)
    empty_thresholds, searched = search_space(thresholds, configured_empty)
    grid = np.asarray(threshold_scores(truth, probs, thresholds, min_areas, empty_thresholds=empty_thresholds),
                      dtype=np.float64)  # [T, E, A]
    grid[~searched] = -np.inf
    threshold, empty_threshold, min_area = best_choice(grid, thresholds, empty_thresholds, min_areas)
    # the best of the plain rule (empty decision at the mask threshold), for the summary
    plain = grid[np.arange(len(thresholds)), [empty_thresholds.index(t) for t in thresholds]]  # [T, A]

    # Rescore the chosen masks directly (the same binarize as `submit`), so tune.json, oof.csv
    # and the submission agree even where the grid search rounds differently.
    at_05 = image_scores(truth, binarize(probs, DEFAULT_THRESHOLD, DEFAULT_MIN_AREA))
    tuned = image_scores(truth, binarize(probs, threshold, min_area, empty_threshold=empty_threshold))
    if tuned.mean() < at_05.mean():
        threshold, empty_threshold, min_area, tuned = DEFAULT_THRESHOLD, DEFAULT_THRESHOLD, DEFAULT_MIN_AREA, at_05
    # 1st place: blank images (one pixel value) carry no salt; forcing them empty is only kept
    # when it helps on this OOF.
    blank_scores = image_scores(truth, binarize(probs, threshold, min_area, empty_mask=blank,
                                                empty_threshold=empty_threshold))
    empty_blank = bool(blank.any() and blank_scores.mean() > tuned.mean())
    return {
        "threshold": float(threshold),
        "empty_threshold": float(empty_threshold),
        "min_area": int(min_area),
        "empty_blank": empty_blank,
        "post": PostProcess(threshold, min_area, empty_threshold, empty_blank),
        "cv_at_05": float(at_05.mean()),
        "cv_plain_rule": float(plain.max()),
        "cv_before_blank": float(tuned.mean()),
        "cv_blank_forced_empty": float(blank_scores.mean()),
        "image_scores": blank_scores if empty_blank else tuned,
        "grid": grid,
        "n_searched": int(searched.sum()) * len(min_areas),
        "thresholds": thresholds,
        "empty_thresholds": empty_thresholds,
        "min_areas": min_areas,
    }


# ---------------------------------------------------------------- the command


def tune_run(run_dir: str | Path, *, leaderboard_csv: str | Path = LEADERBOARD_CSV) -> dict:
    """Tune the run's post-processing on its OOF; write tune.json and oof.csv; record the run."""
    from pipeline.data import is_blank, load_train
    from pipeline.folds import coverage_class
    from pipeline.leaderboard import record_run
    from pipeline.rle import encode_many, write_rle_csv
    from pipeline.manifests import tune_inputs

    started = time.perf_counter()
    run = Path(run_dir)
    check_blend_finished(run)  # a blend killed part-way: its command, before its half-written files
    cfg = load_run_config(run)
    # every fold finished with the run's config; tune.json records which results it tuned on
    inputs = tune_inputs(cfg, run)
    ids, probs = assemble_oof(run)
    if not ids:
        raise PipelineError(f"{run}: the config trains no folds, nothing to tune")
    train = load_train(cfg.data, ids)
    if list(train.ids) != ids:
        raise PipelineError(f"{cfg.data}: returned train images in another order than the OOF ids")
    truth = np.asarray(train.masks, dtype=bool)
    blank = np.asarray(is_blank(train.images), dtype=bool)

    found = tune_oof(truth, probs, blank, cfg)
    scores = found["image_scores"]
    fold_of = oof_fold_of(run)
    folds = np.array([fold_of[i] for i in ids])
    result: dict[str, Any] = {
        "threshold": round(found["threshold"], 6),
        "empty_threshold": round(found["empty_threshold"], 6),
        "min_area": found["min_area"],
        "cv_at_05": round(found["cv_at_05"], 6),
        "cv_tuned": round(float(scores.mean()), 6),
        # the best CV with the empty decision at the mask threshold (before the empty threshold existed)
        "cv_plain_rule": round(found["cv_plain_rule"], 6),
        "per_class": _group_scores(scores, np.asarray(coverage_class(truth))),
        "per_fold": _group_scores(scores, folds),
        "n_images": len(ids),
        "empty_blank": found["empty_blank"],
        "n_blank": int(blank.sum()),
        "cv_blank_forced_empty": round(found["cv_blank_forced_empty"], 6),
        "folds": cfg.fold_list(),
        "grid_size": [len(found["thresholds"]), len(found["empty_thresholds"]), len(found["min_areas"])],
        "n_searched": found["n_searched"],
        "seconds": 0.0,
        **inputs,
    }

    masks = found["post"].apply(probs, blank=blank)
    result["empty_decision"] = empty_decision_report(truth, masks, scores,
                                                     binarize(probs, found["threshold"], DEFAULT_MIN_AREA))
    write_rle_csv(RunDir(run).oof_csv, ids, encode_many(masks))
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(format_summary(run, result, found))
    record_run(run, result, leaderboard_csv=leaderboard_csv)
    # tune.json last: it tells `all` that tuning is done, so it must not exist when the
    # leaderboard row could not be written (a full disk), or the run would never be recorded
    write_tuned(run, found["post"], result)
    return result


def format_summary(run: Path, result: dict, found: dict) -> str:
    gain = result["cv_tuned"] - result["cv_at_05"]
    blank_line = (
        f"  blank images forced empty:  {result['cv_blank_forced_empty']:.4f} over {result['n_blank']} blank "
        f"-> {'applied' if result['empty_blank'] else 'not applied'}"
    )
    post = found["post"]
    lines = [
        f"{run}: {result['n_images']} OOF images from folds {','.join(map(str, result['folds']))}",
        f"  CV at threshold 0.50, min area 0:  {result['cv_at_05']:.4f}",
        f"  CV tuned ({post.describe()}):  "
        f"{result['cv_tuned']:.4f}  ({gain:+.4f}; {found['n_searched']} combinations searched)",
    ]
    if post.empty_threshold != post.threshold:
        # what deciding "any salt?" at its own threshold gained over the best plain min-area rule
        gain_empty = found["cv_before_blank"] - result["cv_plain_rule"]
        lines.append(f"  empty decision at {post.empty_threshold:.2f}, not at the mask threshold: "
                     f"{gain_empty:+.4f} over the best with one threshold ({result['cv_plain_rule']:.4f})")
    lines += [
        blank_line,
        "  per fold:   " + "  ".join(f"{k}: {v['score']:.4f} ({v['n']})" for k, v in result["per_fold"].items()),
        "  per coverage class (0 = empty):",
    ]
    lines += [f"    class {k:>2}  {v['n']:5d} images  {v['score']:.4f}  (costs the CV {v['cv_lost']:.4f})"
              for k, v in result["per_class"].items()]
    decision = result.get("empty_decision")
    if decision:
        lines.append(
            f"  empty decision: {decision['salt_called_empty']} of {decision['n_salt']} salt images submitted "
            f"empty (-{decision['cv_lost_salt_called_empty']:.4f}), {decision['empty_called_salt']} of "
            f"{decision['n_empty']} empty ones given a mask (-{decision['cv_lost_empty_called_salt']:.4f}); "
            f"all decided right: {decision['cv_empty_oracle']:.4f}")
    lines.append(f"  wrote {RunDir(run).tune} and {RunDir(run).oof_csv}")
    return "\n".join(lines)
