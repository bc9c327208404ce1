"""The TGS Salt competition metric, vectorised over images, thresholds and min areas.

Per image, with one object per mask, the score is the mean over the IoU thresholds
0.50, 0.55, ..., 0.95 of a hit, and a hit is IoU > t (strictly greater: Kaggle's
evaluation page says an object is a hit "if its intersection over union with a
ground truth object is greater than" the threshold). So IoU exactly 0.5 scores 0.
An empty truth with an empty prediction scores 1 (nothing to find, nothing
claimed); exactly one of them empty scores 0. The dataset score is the mean over
images.

IoU > t is tested in integers, 100 * intersection > percent * union, so a ratio
that lands exactly on a threshold (11/20 vs 0.55) is never decided by float
rounding. A probability map is binarised as `probs > threshold`, compared in the
probabilities' own precision without rounding the threshold (see `above_threshold`).

Post-processing: the mask `probs > threshold` is kept only when at least `min_area`
pixels have `probs > empty_threshold`, else the image is predicted empty. The empty
decision ("is there salt at all?") may use a stricter threshold than the one that draws
the mask; empty_threshold == threshold is the plain min-area rule.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from pipeline.errors import PipelineError
from pipeline.rle import as_mask_stack

THRESHOLDS = np.arange(0.5, 1.0, 0.05)
# The same thresholds as exact integers (percent), for rounding-free IoU tests.
_THRESHOLD_PERCENTS = np.arange(50, 100, 5)
# Rows (images) per block: keeps the uint8 work arrays of threshold_scores in cache.
_ROWS_PER_BLOCK = 64


# ---------------------------------------------------------------- per image


def image_scores(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """The competition score of each image, float64 [N], for bool masks [N, H, W]."""
    truth, pred = _as_masks(truth, "truth"), _as_masks(pred, "pred")
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and pred {pred.shape} differ in shape")
    truth_rows, pred_rows = _rows(truth), _rows(pred)
    intersection = _count_per_row(truth_rows & pred_rows)
    union = _count_per_row(truth_rows) + _count_per_row(pred_rows) - intersection
    return _scores_from_counts(intersection, union)


def competition_score(truth: np.ndarray, pred: np.ndarray) -> float:
    """Mean per-image score over the dataset (the Kaggle leaderboard number)."""
    scores = image_scores(truth, pred)
    if scores.size == 0:
        raise ValueError("competition_score needs at least one image")
    return float(scores.mean())


def _scores_from_counts(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Per-image score from integer counts of any shape; union == 0 means both empty."""
    return _tenths_from_counts(intersection, union) / 10.0


def _tenths_from_counts(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """10 x the per-image score, as int64 (0..10): the hits over the ten IoU thresholds."""
    intersection = intersection.astype(np.int64)[..., None]
    union = union.astype(np.int64)[..., None]
    hits = np.count_nonzero(100 * intersection > _THRESHOLD_PERCENTS * union, axis=-1)
    return np.where(union[..., 0] == 0, 10, hits).astype(np.int64)


# ---------------------------------------------------------------- post-processing


def mask_areas(masks: np.ndarray) -> np.ndarray:
    """Pixels per mask, int64 [N], of bool masks [N, H, W]."""
    return _count_per_row(_rows(_as_masks(masks, "masks")))


def above_threshold(probs: np.ndarray, threshold: float) -> np.ndarray:
    """`probs > threshold` as threshold_scores decides it (the threshold taken exactly as float64).

    Comparing a float16 array with a Python float lets numpy pick the precision;
    this pins it, so the masks submitted match the masks that were tuned.
    """
    probs = np.asarray(probs)
    cuts = _exact_cuts(probs.dtype, np.array([threshold], dtype=np.float64))
    if cuts is not None:
        return probs >= cuts[0]
    # np.float64 is strongly typed: numpy compares in float64 instead of casting the threshold down
    return probs > np.float64(threshold)


# ---------------------------------------------------------------- threshold search


def threshold_scores(
    truth: np.ndarray,
    probs: np.ndarray,
    thresholds: Sequence[float],
    min_areas: Sequence[int] = (0,),
    empty_thresholds: Sequence[float] | None = None,
) -> np.ndarray:
    """Dataset score [T, A] of `probs > thresholds[t]` with masks under `min_areas[a]` pixels emptied.

    With `empty_thresholds` [E]: the score [T, E, A] of the mask `probs > thresholds[t]`,
    emptied when fewer than `min_areas[a]` pixels have `probs > empty_thresholds[e]`
    (a stricter "is there salt at all" decision; e with the same value as t is the [T, A] rule).

    One pass per block of images gives, for every threshold at once, each image's
    predicted area and its intersection with the truth; IoU and min-area rules are
    then array operations on those [N, T] counts. 25 thresholds x 4000 masks take
    a fraction of a second (benchmarks/metric_rle.py).
    """
    truth = _as_masks(truth, "truth")
    probs = np.asarray(probs)
    if not np.issubdtype(probs.dtype, np.floating):
        raise TypeError(f"probs must be floating point, got {probs.dtype}")
    if probs.shape != truth.shape:
        raise ValueError(f"truth {truth.shape} and probs {probs.shape} differ in shape")
    if truth.shape[0] == 0:
        raise ValueError("threshold_scores needs at least one image")
    thresholds = _threshold_list(thresholds, "thresholds")
    min_areas = np.asarray(min_areas)
    if min_areas.ndim != 1 or min_areas.size == 0 or not np.issubdtype(min_areas.dtype, np.integer) or (min_areas < 0).any():
        raise ValueError(f"min_areas must be a non-empty list of non-negative integers, got {min_areas!r}")
    if empty_thresholds is not None:
        return _empty_threshold_scores(truth, probs, thresholds, min_areas,
                                       _threshold_list(empty_thresholds, "empty_thresholds"))
    if thresholds.size > 254:
        raise ValueError(f"at most 254 thresholds at once (bins are uint8), got {thresholds.size}")

    order = np.argsort(thresholds, kind="stable")
    pred_area, intersection = _areas_above(truth, probs, thresholds[order])  # [N, T] each, sorted thresholds
    truth_area = _count_per_row(_rows(truth)).astype(np.int64)
    union = truth_area[:, None] + pred_area - intersection
    scores = _scores_from_counts(intersection, union)  # [N, T]
    # A mask emptied by min_area scores 1 on an empty truth, else 0.
    emptied = pred_area[:, :, None] < min_areas[None, None, :]  # [N, T, A]
    empty_score = (truth_area == 0).astype(np.float64)[:, None, None]
    per_image = np.where(emptied, empty_score, scores[:, :, None])
    sorted_result = per_image.mean(axis=0)  # [T, A]
    result = np.empty_like(sorted_result)
    result[order] = sorted_result
    return result


def _threshold_list(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0 or not np.isfinite(array).all():
        raise ValueError(f"{name} must be a non-empty list of finite numbers, got {array!r}")
    return array


def _empty_threshold_scores(truth: np.ndarray, probs: np.ndarray, thresholds: np.ndarray,
                            min_areas: np.ndarray, empty_thresholds: np.ndarray) -> np.ndarray:
    """threshold_scores' [T, E, A] grid, from one binning pass over both threshold lists.

    With s[n, t] the score of image n at mask threshold t and z[n] its score when emptied
    (1 on an empty truth, else 0), result[t, e, a] = mean_n s[n, t] - mean_n emptied[n, e, a]
    * (s[n, t] - z[n]): one matrix product, no [N, T, E, A] array. Scores are counted in
    tenths (integers), so the float64 product is exact and ties stay ties.
    """
    levels = np.unique(np.concatenate([thresholds, empty_thresholds]))  # sorted, each value once
    if levels.size > 254:
        raise ValueError(f"at most 254 distinct thresholds and empty thresholds at once (bins are uint8), "
                         f"got {levels.size}")
    pred_area, intersection = _areas_above(truth, probs, levels)  # [N, L] each
    mask_at = np.searchsorted(levels, thresholds)  # column of each threshold, in the caller's order
    empty_at = np.searchsorted(levels, empty_thresholds)
    truth_area = _count_per_row(_rows(truth)).astype(np.int64)
    count = truth.shape[0]
    union = truth_area[:, None] + pred_area[:, mask_at] - intersection[:, mask_at]
    tenths = _tenths_from_counts(intersection[:, mask_at], union)  # [N, T]
    emptied_tenths = np.where(truth_area == 0, 10, 0)  # [N]
    # emptied[n, e, a]: fewer than min_areas[a] pixels above empty_thresholds[e]
    emptied = pred_area[:, empty_at, None] < min_areas[None, None, :]  # [N, E, A]
    change = (tenths - emptied_tenths[:, None]).astype(np.float64)  # [N, T]
    lost = emptied.reshape(count, -1).astype(np.float64).T @ change  # [E*A, T], exact integers
    total = tenths.sum(axis=0).astype(np.float64)  # [T]
    grid = (total[None, :] - lost).reshape(empty_thresholds.size, min_areas.size, thresholds.size)
    return grid.transpose(2, 0, 1) / (10.0 * count)


def _areas_above(truth: np.ndarray, probs: np.ndarray, sorted_thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image and threshold: #pixels with prob > t, and how many of those are salt."""
    count, n_thresholds = truth.shape[0], sorted_thresholds.size
    n_bins = n_thresholds + 1
    truth_rows, prob_rows = _rows(truth), _rows(probs)
    pred_area = np.empty((count, n_thresholds), dtype=np.int64)
    intersection = np.empty((count, n_thresholds), dtype=np.int64)
    binner = _make_binner(probs.dtype, sorted_thresholds)
    key_dtype = np.uint8 if 2 * n_bins <= 256 else np.uint16
    for first in range(0, count, _ROWS_PER_BLOCK):
        block = slice(first, first + _ROWS_PER_BLOCK)
        # bins[i, p] = how many thresholds pixel p's probability exceeds, so the pixel
        # is predicted salt at threshold j exactly when bins > j.
        bins = binner(prob_rows[block])
        rows = bins.shape[0]
        # One histogram per (image, is-salt) pair, all from a single bincount: ~2x
        # faster than counting `bins > j` row by row for every threshold.
        bin_key = bins.astype(key_dtype) + truth_rows[block].view(np.uint8).astype(key_dtype) * key_dtype(n_bins)
        keys = (np.arange(rows, dtype=np.intp) * (2 * n_bins))[:, None] + bin_key
        histogram = np.bincount(keys.ravel(), minlength=rows * 2 * n_bins).reshape(rows, 2, n_bins)
        # at_least[i, s, b] = pixels of image i, salt flag s, with bin >= b
        at_least = histogram[:, :, ::-1].cumsum(axis=2)[:, :, ::-1]
        intersection[block] = at_least[:, 1, 1:]
        pred_area[block] = at_least[:, 0, 1:] + at_least[:, 1, 1:]
    return pred_area, intersection


def _make_binner(dtype: np.dtype, sorted_thresholds: np.ndarray):
    """A function mapping probabilities to uint8 bins: the count of thresholds each exceeds."""
    if dtype == np.float16:
        # Only 65536 float16 values exist: bin each once (exactly, in float64) and look
        # the pixels up by their bit pattern, instead of 25 float16 comparisons each.
        every_value = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float64)
        lookup = (every_value[:, None] > sorted_thresholds[None, :]).sum(axis=1).astype(np.uint8)
        return lambda block: lookup[block.view(np.uint16)]

    cuts = _exact_cuts(dtype, sorted_thresholds)

    def compare_and_count(block: np.ndarray) -> np.ndarray:
        bins = np.zeros(block.shape, dtype=np.uint8)
        above = np.empty(block.shape, dtype=bool)
        for j in range(sorted_thresholds.size):
            if cuts is None:
                np.greater(block, sorted_thresholds[j], out=above)
            else:
                np.greater_equal(block, cuts[j], out=above)
            bins += above.view(np.uint8)
        return bins

    return compare_and_count


def _exact_cuts(dtype: np.dtype, thresholds: np.ndarray) -> np.ndarray | None:
    """For float32 probabilities: the smallest float32 above each float64 threshold.

    `p > t` (t exact) then equals `p >= cut` computed in float32, which is several
    times faster than promoting every pixel to float64. None: compare as is.
    """
    if dtype != np.float32:
        return None
    nearest = thresholds.astype(np.float32)
    above = nearest.astype(np.float64) > thresholds
    return np.where(above, nearest, np.nextafter(nearest, np.float32(np.inf))).astype(np.float32)


# ---------------------------------------------------------------- CSV files


def score_csvs(truth_csv: str | os.PathLike, pred_csv: str | os.PathLike,
               shape: tuple[int, int] = (101, 101)) -> tuple[float, int]:
    """(competition score, image count) of a prediction CSV against a truth CSV, both id,rle_mask."""
    from pipeline.rle import check_many, decode_chunks, read_rle_csv

    truth_df, pred_df = read_rle_csv(truth_csv), read_rle_csv(pred_csv)
    truth_ids, pred_ids = truth_df["id"].tolist(), pred_df["id"].tolist()
    truth_set, pred_set = set(truth_ids), set(pred_ids)
    missing = [image_id for image_id in truth_ids if image_id not in pred_set]
    extra = [image_id for image_id in pred_ids if image_id not in truth_set]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
        if extra:
            parts.append(f"{len(extra)} extra (e.g. {extra[0]!r})")
        raise PipelineError(f"{pred_csv}: ids differ from {truth_csv}: {', '.join(parts)}")
    if not truth_ids:
        raise PipelineError(f"{truth_csv}: no rows to score")

    pred_rles = pred_df.set_index("id")["rle_mask"].reindex(truth_ids).tolist()
    # Chunk by chunk, so memory stays a few MB whatever the row count; every truth row is
    # checked before any prediction row, so a bad truth file is named first.
    check_many(truth_df["rle_mask"].tolist(), shape, ids=truth_ids, where=str(truth_csv))
    tenths = 0
    truth_chunks = decode_chunks(truth_df["rle_mask"].tolist(), shape, ids=truth_ids, where=str(truth_csv))
    pred_chunks = decode_chunks(pred_rles, shape, ids=truth_ids, where=str(pred_csv))
    for (_, truth), (_, pred) in zip(truth_chunks, pred_chunks):
        truth_rows, pred_rows = _rows(truth), _rows(pred)
        intersection = _count_per_row(truth_rows & pred_rows)
        union = _count_per_row(truth_rows) + _count_per_row(pred_rows) - intersection
        tenths += int(_tenths_from_counts(intersection, union).sum())
    return tenths / (10 * len(truth_ids)), len(truth_ids)


# ---------------------------------------------------------------- helpers


def _as_masks(masks: np.ndarray, name: str) -> np.ndarray:
    return as_mask_stack(masks, name)


def _rows(array: np.ndarray) -> np.ndarray:
    return array.reshape(array.shape[0], -1)


def _count_per_row(rows: np.ndarray) -> np.ndarray:
    """True pixels per row of a bool [N, P] array.

    A uint8 sum with a small accumulator is ~6x faster than count_nonzero(axis=1),
    which goes through int64; uint16 holds any 101x101 count.
    """
    accumulator = np.uint16 if rows.shape[1] < 2**16 else np.uint64
    return np.add.reduce(rows.view(np.uint8), axis=1, dtype=accumulator).astype(np.int64)
