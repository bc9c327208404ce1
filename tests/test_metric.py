"""The competition metric: hand-checked IoU cases, the vectorised threshold search
against a naive loop (also with a separate empty threshold), min-area post-processing, and
scoring CSV files."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from pipeline import metric, rle
from pipeline.cli import main
from pipeline.errors import PipelineError

REPO_ROOT = Path(__file__).resolve().parents[1]


def overlap(truth_area: int, pred_area: int, intersection: int, shape=(10, 10)):
    """A truth and a pred mask with the given areas and overlap (pixels taken in a line)."""
    truth = np.zeros(shape[0] * shape[1], bool)
    pred = np.zeros_like(truth)
    truth[:truth_area] = True
    first = truth_area - intersection
    pred[first:first + pred_area] = True
    return truth.reshape(shape), pred.reshape(shape)


def pixel(row: int, col: int, shape=(4, 4)):
    mask = np.zeros(shape, bool)
    mask[row, col] = True
    return mask


EMPTY = np.zeros((4, 4), bool)
FULL = np.ones((4, 4), bool)
LEFT_HALF = np.zeros((4, 4), bool)
LEFT_HALF[:, :2] = True
MIDDLE_HALF = np.zeros((4, 4), bool)
MIDDLE_HALF[:, 1:3] = True

# (truth, pred, expected score). A hit at threshold t needs IoU > t; thresholds 0.50..0.95.
HAND_CASES = {
    "empty_truth_empty_pred_is_1": (EMPTY, EMPTY, 1.0),
    "empty_truth_one_pixel_pred_is_0": (EMPTY, pixel(0, 0), 0.0),
    "one_pixel_truth_empty_pred_is_0": (pixel(3, 3), EMPTY, 0.0),
    "one_pixel_equal_is_1": (pixel(2, 1), pixel(2, 1), 1.0),
    "one_pixel_elsewhere_is_0": (pixel(2, 1), pixel(1, 2), 0.0),
    "full_vs_full_is_1": (FULL, FULL, 1.0),
    # IoU = 4 / 12 = 1/3: below every threshold
    "half_overlap_is_0": (LEFT_HALF, MIDDLE_HALF, 0.0),
    # IoU = 1/2 exactly: not > 0.5
    "iou_exactly_0.50_is_0": (*overlap(2, 1, 1), 0.0),
    # IoU = 11/20 exactly: > 0.50 only
    "iou_exactly_0.55_is_0.1": (*overlap(20, 11, 11), 0.1),
    # IoU = 12/20 = 0.6 exactly: > 0.50, 0.55
    "iou_exactly_0.60_is_0.2": (*overlap(20, 12, 12), 0.2),
    # IoU = 7/10: > 0.50 .. 0.65
    "iou_exactly_0.70_is_0.4": (*overlap(10, 7, 7), 0.4),
    # IoU = 19/20 = 0.95 exactly: every threshold but 0.95
    "iou_exactly_0.95_is_0.9": (*overlap(20, 19, 19), 0.9),
    # IoU = 24/25 = 0.96 (pred larger than truth): every threshold
    "iou_0.96_pred_larger_is_1": (*overlap(24, 25, 24), 1.0),
    # IoU = 6/10 with both masks partly outside each other: 0.6 -> 0.2
    "iou_0.60_partial_overlap_is_0.2": (*overlap(8, 8, 6), 0.2),
}


@pytest.mark.parametrize(("truth", "pred", "expected"), HAND_CASES.values(), ids=HAND_CASES.keys())
def test_image_score_matches_hand_computed_value(truth, pred, expected):
    assert metric.image_scores(truth[None], pred[None])[0] == pytest.approx(expected, abs=1e-12)


def test_competition_score_is_the_mean_of_image_scores():
    truth = np.stack([case[0] for case in HAND_CASES.values() if case[0].shape == (4, 4)])
    pred = np.stack([case[1] for case in HAND_CASES.values() if case[1].shape == (4, 4)])
    expected = np.mean([case[2] for case in HAND_CASES.values() if case[0].shape == (4, 4)])
    assert metric.competition_score(truth, pred) == pytest.approx(expected)


def test_thresholds_constant_is_kaggles_ten():
    assert len(metric.THRESHOLDS) == 10
    assert metric.THRESHOLDS[0] == 0.5 and metric.THRESHOLDS[-1] == pytest.approx(0.95)


def test_metric_never_modifies_its_inputs():
    truth, pred = overlap(20, 11, 11)
    truth, pred = truth[None], pred[None]
    before = truth.copy(), pred.copy()
    metric.image_scores(truth, pred)
    metric.mask_areas(pred)
    assert np.array_equal(truth, before[0]) and np.array_equal(pred, before[1])


def test_probabilities_are_refused_where_masks_are_expected():
    with pytest.raises(TypeError, match="threshold"):
        metric.image_scores(np.zeros((1, 4, 4), bool), np.full((1, 4, 4), 0.9))


# ---------------------------------------------------------------- min area


def test_min_area_empties_only_masks_below_the_area():
    from pipeline.postprocess import binarize

    pred = np.zeros((4, 5, 5), np.float32)
    pred[1].flat[:3] = 1.0   # area 3
    pred[2].flat[:4] = 1.0   # area 4
    pred[3].flat[:10] = 1.0  # area 10
    kept = binarize(pred, 0.5, 4)
    assert kept.sum(axis=(1, 2)).tolist() == [0, 0, 4, 10]
    assert pred.sum() == 17  # input untouched
    assert np.array_equal(binarize(pred, 0.5, 0), pred > 0.5)
    assert binarize(pred, 0.5, 0) is not pred


# ---------------------------------------------------------------- threshold search vs a naive loop


def naive_threshold_scores(truth, probs, thresholds, min_areas):
    """One image at a time, straight from the definition, IoU compared as exact fractions."""
    table = np.zeros((len(thresholds), len(min_areas)))
    for t, threshold in enumerate(thresholds):
        for a, min_area in enumerate(min_areas):
            scores = []
            for truth_mask, prob_map in zip(truth, probs):
                pred = prob_map.astype(np.float64) > threshold
                if pred.sum() < min_area:
                    pred[:] = False
                intersection = int((pred & truth_mask).sum())
                union = int((pred | truth_mask).sum())
                if union == 0:
                    scores.append(1.0)
                else:
                    iou = Fraction(intersection, union)
                    scores.append(sum(iou > Fraction(k, 100) for k in range(50, 100, 5)) / 10)
            table[t, a] = np.mean(scores)
    return table


def random_case(dtype, seed=0, count=48, shape=(12, 12)):
    rng = np.random.default_rng(seed)
    truth = np.zeros((count, *shape), bool)
    for index in range(count):
        if index % 3:  # a third of the truths empty, as in TGS
            top, left = rng.integers(0, shape[0] // 2, size=2)
            truth[index, top:top + rng.integers(1, shape[0]), left:left + rng.integers(1, shape[1])] = True
    noise = rng.random((count, *shape))
    probs = np.clip(0.55 * truth + 0.6 * noise, 0, 1)
    probs[::4] = np.round(probs[::4] * 20) / 20  # values exactly on the thresholds
    return truth, probs.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_threshold_scores_equal_a_naive_per_image_loop(dtype):
    truth, probs = random_case(dtype)
    thresholds = [0.3, 0.45, 0.5, 0.55, 1 / 3, 0.7, 0.95]
    min_areas = [0, 5, 20]
    fast = metric.threshold_scores(truth, probs, thresholds, min_areas)
    assert fast.shape == (len(thresholds), len(min_areas))
    np.testing.assert_allclose(fast, naive_threshold_scores(truth, probs, thresholds, min_areas), atol=1e-12)


def test_threshold_scores_keep_the_callers_threshold_order():
    truth, probs = random_case(np.float32, seed=1)
    thresholds = [0.7, 0.2, 0.5, 0.2]
    scores = metric.threshold_scores(truth, probs, thresholds)
    for row, threshold in enumerate(thresholds):
        expected = metric.competition_score(truth, metric.above_threshold(probs, threshold))
        assert scores[row, 0] == pytest.approx(expected, abs=1e-12)


def test_threshold_scores_handle_a_fine_grid_of_many_thresholds():
    truth, probs = random_case(np.float32, seed=2)
    thresholds = np.linspace(0.01, 0.99, 130)  # more bins than a uint8 histogram key holds
    scores = metric.threshold_scores(truth, probs, thresholds)
    expected = [metric.competition_score(truth, metric.above_threshold(probs, t)) for t in thresholds]
    np.testing.assert_allclose(scores[:, 0], expected, atol=1e-12)
    with pytest.raises(ValueError, match="at most 254 thresholds"):
        metric.threshold_scores(truth, probs, np.linspace(0, 1, 300))


def naive_empty_threshold_scores(truth, probs, thresholds, empty_thresholds, min_areas):
    """[T, E, A] one image at a time: the mask at t, emptied when under min_area pixels exceed e."""
    table = np.zeros((len(thresholds), len(empty_thresholds), len(min_areas)))
    for e, empty_threshold in enumerate(empty_thresholds):
        decided = [int((prob_map.astype(np.float64) > empty_threshold).sum()) for prob_map in probs]
        for a, min_area in enumerate(min_areas):
            keep = np.array([area >= min_area for area in decided])
            for t, threshold in enumerate(thresholds):
                pred = (probs.astype(np.float64) > threshold) & keep[:, None, None]
                table[t, e, a] = naive_threshold_scores(truth, pred.astype(np.float64), [0.5], [0])[0, 0]
    return table


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_empty_threshold_grid_equals_a_naive_per_image_loop(dtype):
    truth, probs = random_case(dtype, seed=4)
    thresholds = [0.45, 0.3, 1 / 3, 0.55, 0.7]
    empty_thresholds = [0.7, 0.6, 0.45, 0.9, 0.95]  # shares values with thresholds, and in another order
    min_areas = [0, 3, 20]
    fast = metric.threshold_scores(truth, probs, thresholds, min_areas, empty_thresholds=empty_thresholds)
    assert fast.shape == (len(thresholds), len(empty_thresholds), len(min_areas))
    naive = naive_empty_threshold_scores(truth, probs, thresholds, empty_thresholds, min_areas)
    np.testing.assert_allclose(fast, naive, atol=1e-12)
    # min area 0 never empties: every empty threshold scores as the plain mask
    np.testing.assert_allclose(fast[:, :, 0], np.repeat(fast[:, :1, 0], len(empty_thresholds), axis=1), atol=0)


def test_empty_thresholds_equal_to_the_thresholds_give_the_2d_grid_on_the_diagonal():
    truth, probs = random_case(np.float16, seed=5)
    thresholds = [0.7, 0.2, 0.5, 0.2, 0.45]  # duplicates and any order, as the 2-D grid allows
    min_areas = [20, 0, 5]
    plain = metric.threshold_scores(truth, probs, thresholds, min_areas)
    grid = metric.threshold_scores(truth, probs, thresholds, min_areas, empty_thresholds=thresholds)
    diagonal = grid[np.arange(len(thresholds)), np.arange(len(thresholds))]
    np.testing.assert_allclose(diagonal, plain, atol=1e-12)


@pytest.mark.parametrize(("empty_thresholds", "message"), [
    ([], "empty_thresholds must be a non-empty list"),
    ([0.5, float("nan")], "empty_thresholds must be a non-empty list of finite numbers"),
    ([[0.5, 0.6]], "empty_thresholds must be"),
    (np.linspace(0.001, 0.999, 250), "at most 254 distinct thresholds and empty thresholds"),
])
def test_bad_empty_thresholds_are_a_clear_value_error(empty_thresholds, message):
    truth, probs = random_case(np.float32, count=4)
    with pytest.raises(ValueError, match=message):
        metric.threshold_scores(truth, probs, [0.3, 0.4, 0.5, 0.55, 0.6], [0, 5], empty_thresholds=empty_thresholds)


def test_above_threshold_matches_an_exact_float64_comparison():
    every_float16 = np.arange(2**16, dtype=np.uint16).view(np.float16)
    every_float16 = every_float16[np.isfinite(every_float16)]
    for threshold in (0.3, 0.45, 0.7, 1 / 3):
        exact = every_float16.astype(np.float64) > threshold
        assert np.array_equal(metric.above_threshold(every_float16, threshold), exact)
        as_float32 = every_float16.astype(np.float32)
        assert np.array_equal(metric.above_threshold(as_float32, threshold), exact)


# ---------------------------------------------------------------- the real sample


@pytest.fixture(scope="module")
def real_truth(tgs_sample):
    table = rle.read_rle_csv(tgs_sample / "train.csv")
    return rle.decode_many(table["rle_mask"].tolist(), ids=table["id"].tolist(), where="train.csv")


def test_all_empty_prediction_on_real_sample_scores_0_39(real_truth):
    score = metric.competition_score(real_truth, np.zeros_like(real_truth))
    assert score == pytest.approx(0.3905, abs=0.001)


def test_threshold_scores_on_real_sample_perfect_and_emptied(real_truth):
    probs = real_truth.astype(np.float16)
    scores = metric.threshold_scores(real_truth, probs, [0.1, 0.5, 0.9], [0, 20000])
    np.testing.assert_allclose(scores[:, 0], 1.0)
    # min_area above 101*101 empties every prediction: the all-empty score
    np.testing.assert_allclose(scores[:, 1], metric.competition_score(real_truth, np.zeros_like(real_truth)))


def test_empty_threshold_grid_on_real_sample_scores_what_submit_writes(real_truth):
    from pipeline.postprocess import binarize

    rng = np.random.default_rng(0)
    probs = np.clip(0.6 * real_truth + 0.5 * rng.random(real_truth.shape), 0, 1).astype(np.float16)
    thresholds, empty_thresholds, min_areas = [0.45, 0.55], [0.55, 0.9], [0, 50, 300]
    grid = metric.threshold_scores(real_truth, probs, thresholds, min_areas, empty_thresholds=empty_thresholds)
    for t, threshold in enumerate(thresholds):
        for e, empty_threshold in enumerate(empty_thresholds):
            for a, min_area in enumerate(min_areas):
                masks = binarize(probs, threshold, min_area, empty_threshold=empty_threshold)
                assert grid[t, e, a] == pytest.approx(metric.competition_score(real_truth, masks), abs=1e-12)


def test_score_csvs_on_real_sample(tgs_sample, tmp_path):
    table = rle.read_rle_csv(tgs_sample / "train.csv")
    assert metric.score_csvs(tgs_sample / "train.csv", tgs_sample / "train.csv") == (1.0, len(table))
    empty_pred = tmp_path / "empty.csv"
    rle.write_rle_csv(empty_pred, table["id"].tolist()[::-1], [""] * len(table))  # order does not matter
    score, count = metric.score_csvs(tgs_sample / "train.csv", empty_pred)
    assert count == len(table) and score == pytest.approx(0.3905, abs=0.001)


# ---------------------------------------------------------------- score_csvs errors and the CLI


@pytest.fixture()
def truth_csv(tmp_path):
    path = tmp_path / "truth.csv"
    path.write_text("id,rle_mask\na,1 5\nb,\nc,20 3\n")
    return path


def test_score_csvs_scores_small_files(truth_csv, tmp_path):
    pred = tmp_path / "pred.csv"
    pred.write_text("id,rle_mask\nc,20 3\nb,\na,1 4\n")  # IoU 4/5 for a
    score, count = metric.score_csvs(truth_csv, pred)
    assert count == 3
    assert score == pytest.approx((0.6 + 1 + 1) / 3)


@pytest.mark.parametrize(
    ("pred_text", "fragments"),
    [
        ("id,rle_mask\na,1 5\nb,\n", ["pred.csv: ids differ from", "truth.csv", "1 missing (e.g. 'c')"]),
        ("id,rle_mask\na,1 5\nb,\nc,\nd,\nz,\n", ["2 extra (e.g. 'd')"]),
        ("id,rle_mask\na,1 5\nx,\nc,\n", ["1 missing (e.g. 'b')", "1 extra (e.g. 'x')"]),
        ("id,rle_mask\na,1 5\nb,1 2 3\nc,\n", ["pred.csv: id b: bad RLE (odd number of values (3)"]),
        ("id,rle_mask\na,1 5\nb,\nc,10200 9\n", ["pred.csv: id c: bad RLE (run 1", "past the 10201 pixels"]),
        ("a,1 5\nb,\nc,\n", ["pred.csv: header is 'a,1 5', expected 'id,rle_mask'"]),
        ("", ["pred.csv: empty file"]),
    ],
    ids=["missing", "extra", "missing_and_extra", "odd_values", "run_past_end", "no_header", "empty"],
)
def test_score_csvs_bad_prediction_is_one_line_pipeline_error(truth_csv, tmp_path, pred_text, fragments):
    pred = tmp_path / "pred.csv"
    pred.write_text(pred_text)
    with pytest.raises(PipelineError) as excinfo:
        metric.score_csvs(truth_csv, pred)
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_score_csvs_bad_truth_row_names_the_truth_file(tmp_path):
    truth = tmp_path / "truth.csv"
    truth.write_text("id,rle_mask\na,0 5\n")
    pred = tmp_path / "pred.csv"
    pred.write_text("id,rle_mask\na,\n")
    with pytest.raises(PipelineError, match=r"truth.csv: id a: bad RLE \(run 1 starts at 0"):
        metric.score_csvs(truth, pred)


def test_cli_score_prints_score_and_count(truth_csv, tmp_path, capsys):
    pred = tmp_path / "pred.csv"
    pred.write_text("id,rle_mask\na,1 5\nb,\nc,\n")
    assert main(["score", "--truth", str(truth_csv), "--pred", str(pred)]) == 0
    assert capsys.readouterr().out.strip() == f"score {2 / 3:.4f} over 3 images"


def test_cli_score_bad_input_exits_2_with_one_line(truth_csv, tmp_path, capsys):
    pred = tmp_path / "pred.csv"
    pred.write_text("id,rle_mask\na,1 x\nb,\nc,\n")
    assert main(["score", "--truth", str(truth_csv), "--pred", str(pred)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pred.csv: id a: bad RLE ('x' is not an integer)" in err


def test_python_dash_m_pipeline_score_runs_as_a_command(truth_csv, tmp_path):
    pred = tmp_path / "pred.csv"
    pred.write_text("id,rle_mask\na,1 5\nb,\nc,20 3\n")
    ok = subprocess.run([sys.executable, "-m", "pipeline", "score", "--truth", str(truth_csv), "--pred", str(pred)],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == "score 1.0000 over 3 images", ok.stderr
    missing = subprocess.run([sys.executable, "-m", "pipeline", "score", "--truth", str(truth_csv),
                              "--pred", str(tmp_path / "nope.csv")],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "nope.csv: file not found" in missing.stderr
