"""Speed of the vectorised metric and RLE against the naive per-image / per-pixel code they replace.

    python -m benchmarks.metric_rle [--count 4000] [--thresholds 25] [--repeats 5] [--naive-repeats 3]

Data: the real TGS masks (train.csv decoded; ../shared/tgs or $TGS_SAMPLE) tiled to
--count images, or random blobs when the sample is absent. Probabilities are the
truth plus noise, as float16 (what oof.npy holds) and float32. Each timing is the
median of repeats; every fast result is checked equal to its naive counterpart
before it is reported. The pure-Python per-pixel encoder is timed on a subset and
scaled to --count (marked "scaled" in the table): running it on everything would
take minutes. Prints a table and writes benchmarks/results/metric_rle-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline import metric, rle
from benchmarks import save_result

DEFAULT_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "tgs"


# ---------------------------------------------------------------- data


def load_masks(count: int, seed: int = 0) -> tuple[np.ndarray, str]:
    sample = Path(os.environ.get("TGS_SAMPLE", DEFAULT_SAMPLE))
    if (sample / "train.csv").is_file():
        table = rle.read_rle_csv(sample / "train.csv")
        masks = rle.decode_many(table["rle_mask"].tolist(), ids=table["id"].tolist(), where=str(sample / "train.csv"))
        source = f"real TGS train.csv ({len(masks)} masks) tiled"
    else:
        masks = random_blobs(count, seed)
        source = "synthetic random blobs (real sample not found)"
    repeats = -(-count // len(masks))
    return np.concatenate([masks] * repeats)[:count], source


def random_blobs(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:101, :101]
    centres = rng.uniform(0, 101, size=(count, 2))
    radii = rng.uniform(5, 60, size=count)
    masks = (rows - centres[:, :1, None]) ** 2 + (cols - centres[:, 1:, None]) ** 2 < radii[:, None, None] ** 2
    masks[rng.random(count) < 0.39] = False  # TGS: 39% empty
    return masks


def fake_probs(masks: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.random(masks.shape, dtype=np.float32)
    return np.clip(0.6 * masks + 0.5 * noise, 0, 1).astype(np.float32)


# ---------------------------------------------------------------- naive versions (what the fast code replaces)


def naive_image_score(truth_mask: np.ndarray, pred: np.ndarray) -> float:
    """One image as a typical kernel scores it: IoU, then ten threshold tests."""
    intersection = np.count_nonzero(truth_mask & pred)
    union = np.count_nonzero(truth_mask | pred)
    if union == 0:
        return 1.0
    return float(np.mean([100 * intersection > k * union for k in range(50, 100, 5)]))


def naive_threshold_scores(truth: np.ndarray, probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per threshold, per image: binarise, score (a typical kernel's loop)."""
    scores = np.empty(len(thresholds))
    for t, threshold in enumerate(thresholds):
        total = sum(naive_image_score(truth_mask, prob_map > np.float64(threshold))
                    for truth_mask, prob_map in zip(truth, probs))
        scores[t] = total / len(truth)
    return scores


def naive_grid_scores(truth: np.ndarray, probs: np.ndarray, thresholds: list[float], empty_thresholds: list[float],
                      searched: np.ndarray, min_areas: list[int]) -> np.ndarray:
    """The tune search as kernels wrote it: per searched (threshold, empty threshold, min area),
    per image, binarise, empty the mask if fewer than min_area pixels are above the empty
    threshold, score. Combinations not searched stay NaN."""
    scores = np.full((len(thresholds), len(empty_thresholds), len(min_areas)), np.nan)
    for t, threshold in enumerate(thresholds):
        preds = [prob_map > np.float64(threshold) for prob_map in probs]
        for e in np.flatnonzero(searched[t]):
            areas = [np.count_nonzero(prob_map > np.float64(empty_thresholds[e])) for prob_map in probs]
            for a, min_area in enumerate(min_areas):
                total = sum(naive_image_score(truth_mask, pred if area >= min_area else np.zeros_like(pred))
                            for truth_mask, pred, area in zip(truth, preds, areas))
                scores[t, e, a] = total / len(truth)
    return scores


def naive_encode_per_image(masks: np.ndarray) -> list[str]:
    """The popular Kaggle-kernel encoder: numpy per image, one image at a time."""
    out = []
    for mask in masks:
        pixels = np.concatenate([[0], mask.T.flatten().astype(np.int8), [0]])
        runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
        runs[1::2] -= runs[::2]
        out.append(" ".join(str(x) for x in runs))
    return out


def naive_encode_per_pixel(masks: np.ndarray) -> list[str]:
    """Pure Python: walk every pixel in column-major order."""
    out = []
    for mask in masks:
        height, width = mask.shape
        values, run_start, position = [], 0, 0
        for col in range(width):
            for row in range(height):
                position += 1
                if mask[row, col]:
                    if not run_start:
                        run_start = position
                elif run_start:
                    values += [run_start, position - run_start]
                    run_start = 0
        if run_start:
            values += [run_start, position + 1 - run_start]
        out.append(" ".join(map(str, values)))
    return out


def naive_decode_per_image(rles: list[str], shape=(101, 101)) -> np.ndarray:
    """The popular Kaggle-kernel decoder: one image at a time, one slice per run, no checks."""
    height, width = shape
    out = np.empty((len(rles), height, width), dtype=bool)
    for index, text in enumerate(rles):
        tokens = text.split()
        starts = np.asarray(tokens[0::2], dtype=int) - 1
        ends = starts + np.asarray(tokens[1::2], dtype=int)
        flat = np.zeros(height * width, dtype=bool)
        for lo, hi in zip(starts, ends):
            flat[lo:hi] = True
        out[index] = flat.reshape(width, height).T
    return out


# ---------------------------------------------------------------- timing


def median_seconds(function: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def run(count: int, n_thresholds: int, repeats: int, naive_repeats: int, pixel_subset: int) -> dict:
    masks, source = load_masks(count)
    probs32 = fake_probs(masks)
    probs16 = probs32.astype(np.float16)
    thresholds = np.linspace(0.2, 0.8, n_thresholds)
    rles = rle.encode_many(masks)
    rows: list[dict] = []

    def add(task: str, method: str, seconds: float, note: str = "") -> None:
        rows.append({"task": task, "method": method, "seconds": seconds, "note": note})

    # --- metric: every threshold at once vs one image at a time
    task = f"threshold_scores {n_thresholds} thr x {count}"
    naive_s, naive = median_seconds(lambda: naive_threshold_scores(masks, probs32, thresholds), naive_repeats)
    for name, probs in (("float16", probs16), ("float32", probs32)):
        fast_s, fast = median_seconds(lambda: metric.threshold_scores(masks, probs, thresholds), repeats)
        reference = naive if name == "float32" else naive_threshold_scores(masks[:200], probs16[:200], thresholds)
        check = fast[:, 0] if name == "float32" else metric.threshold_scores(masks[:200], probs16[:200], thresholds)[:, 0]
        assert np.allclose(check, reference, atol=1e-12), f"threshold_scores ({name}) disagrees with the naive loop"
        add(task, f"vectorised ({name} probs)", fast_s)
    add(task, "naive per-image loop (float32)", naive_s)

    # --- the tune command's search: the default threshold x empty-threshold x min-area grid
    from pipeline.config import Config
    from pipeline.tune import search_grid, search_space

    grid_thresholds, configured_empty, grid_areas = search_grid(Config())
    grid_empty, searched = search_space(grid_thresholds, configured_empty)
    task = f"tune grid {int(searched.sum()) * len(grid_areas)} triples x {count}"

    def grid(truth: np.ndarray, probs: np.ndarray) -> np.ndarray:
        return metric.threshold_scores(truth, probs, grid_thresholds, grid_areas, empty_thresholds=grid_empty)

    fast_s, fast = median_seconds(lambda: grid(masks, probs16), repeats)
    subset = slice(0, min(count, 100))  # the naive search takes minutes on everything: time 100 images
    naive_s, naive = median_seconds(
        lambda: naive_grid_scores(masks[subset], probs16[subset], grid_thresholds, grid_empty, searched, grid_areas), 1)
    check = grid(masks[subset], probs16[subset])
    assert np.allclose(check[searched], naive[searched], atol=1e-12), "grid search disagrees with the naive loop"
    add(task, "threshold_scores(thr, min_areas, empty_thr)", fast_s)
    add(task, "naive per-triple, per-image loop", naive_s * count / len(masks[subset]),
        f"scaled from {len(masks[subset])} images")

    # --- encode
    task = f"encode {count} masks"
    fast_s, fast = median_seconds(lambda: rle.encode_many(masks), repeats)
    image_s, per_image = median_seconds(lambda: naive_encode_per_image(masks), naive_repeats)
    subset = masks[:pixel_subset]
    pixel_s, per_pixel = median_seconds(lambda: naive_encode_per_pixel(subset), 1)
    assert fast == per_image and per_pixel == fast[:pixel_subset], "encoders disagree"
    add(task, "encode_many (vectorised)", fast_s)
    add(task, "naive per-image numpy", image_s)
    add(task, "naive per-pixel Python", pixel_s * count / pixel_subset, f"scaled from {pixel_subset} masks")

    # --- decode
    task = f"decode {count} masks"
    fast_s, decoded = median_seconds(lambda: rle.decode_many(rles), repeats)
    image_s, naive_decoded = median_seconds(lambda: naive_decode_per_image(rles), naive_repeats)
    assert np.array_equal(decoded, masks) and np.array_equal(naive_decoded, masks), "decoders disagree"
    add(task, "decode_many (vectorised, validated)", fast_s)
    add(task, "naive per-image, per-run slices (unchecked)", image_s)

    for row in rows:
        fastest = min(other["seconds"] for other in rows if other["task"] == row["task"])
        row["x_slower_than_fastest"] = row["seconds"] / fastest
    return {
        "benchmark": "metric_rle",
        "host": socket.gethostname(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "data": source,
        "count": count,
        "thresholds": n_thresholds,
        "repeats": repeats,
        "naive_repeats": naive_repeats,
        "rows": rows,
    }


def format_table(result: dict) -> str:
    lines = [f"{result['data']}; {result['count']} images of 101x101; median of {result['repeats']} "
             f"(naive: {result['naive_repeats']}) runs; numpy {result['numpy']}, {result['cpu_count']} CPUs",
             f"{'task':<32} {'method':<44} {'seconds':>9} {'vs best':>8}  note"]
    for row in result["rows"]:
        lines.append(f"{row['task']:<32} {row['method']:<44} {row['seconds']:>9.3f} "
                     f"{row['x_slower_than_fastest']:>7.1f}x  {row['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.metric_rle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=4000, help="images (the sample is tiled to this many)")
    parser.add_argument("--thresholds", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the fast code (median)")
    parser.add_argument("--naive-repeats", type=int, default=3, help="repeats of the naive code (median)")
    parser.add_argument("--pixel-subset", type=int, default=200, help="masks for the per-pixel encoder")
    args = parser.parse_args(argv)

    result = run(args.count, args.thresholds, args.repeats, args.naive_repeats, min(args.pixel_subset, args.count))
    print(format_table(result))
    save_result("metric_rle", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
