"""Submissions: tuned binarisation, one checked row per test image, and a checker that names
the first problem of a bad file in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.postprocess import binarize
from pipeline.submit import check_submission, submit_run
from tests.fake_run import fake_tune, make_fake_run, private_copy


@pytest.fixture(scope="module")
def tuned_run(synth_data, tmp_path_factory):
    """A fake run with test probabilities and a tune.json (threshold 0.4, min area 10)."""
    run = make_fake_run(synth_data, tmp_path_factory.mktemp("submit"))
    fake_tune(run, {"threshold": 0.4, "min_area": 10, "empty_blank": False, "cv_at_05": 0.5, "cv_tuned": 0.6})
    return run


@pytest.fixture
def run(tuned_run, tmp_path, monkeypatch):
    return private_copy(tuned_run, tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def good_csv(tuned_run, synth_data, tmp_path_factory):
    return submit_run(tuned_run, out=tmp_path_factory.mktemp("good") / "good.csv")


def list_test_ids(data) -> list[str]:
    from pipeline.data import list_image_ids

    return list_image_ids(data / "test" / "images")


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- binarize


def test_binarize_applies_threshold_min_area_and_forced_empties():
    probs = np.zeros((3, 101, 101), np.float32)
    probs[0, :10, :10] = 0.6  # 100 pixels above 0.5
    probs[1, :3, :3] = 0.6  # 9 pixels: under min area
    probs[2, :10, :10] = 0.6
    masks = binarize(probs, 0.5, 10, empty_mask=np.array([False, False, True]))
    assert masks.dtype == bool
    assert masks.sum(axis=(1, 2)).tolist() == [100, 0, 0]
    assert probs[0, 0, 0] == np.float32(0.6)  # the input is not modified
    at_half = np.full((1, 101, 101), 0.5)
    for dtype in (np.float16, np.float32, np.float64):  # strictly greater, as in training's validation
        assert binarize(at_half.astype(dtype), 0.5, 0).sum() == 0


def test_binarize_takes_the_threshold_exactly_whatever_the_probability_dtype():
    # 0.4199 rounds up to float16 0.419921875: a float16 comparison would call that value
    # not above the threshold, while tuning (exact thresholds) counted it as salt
    probs = np.full((1, 101, 101), 0.42, np.float16)
    assert float(probs[0, 0, 0]) == 0.419921875 == float(np.float16(0.4199))
    assert binarize(probs, 0.4199, 0).all()
    assert binarize(probs, 0.42, 0).sum() == 0


def test_binarize_decides_emptiness_at_the_empty_threshold_but_draws_at_the_threshold():
    probs = np.zeros((4, 101, 101), np.float32)
    probs[:, :10, :10] = 0.6  # every mask: 100 pixels above 0.5
    probs[0, :2, :2] = 0.95  # 4 pixels above 0.9: under min area 5, emptied
    probs[1, :3, :3] = 0.95  # 9 pixels above 0.9: kept, with all 100 pixels of the mask
    probs[2, :2, :3] = 0.9  # 6 pixels at 0.9 exactly: not above it, emptied
    probs[3] = 0.0
    masks = binarize(probs, 0.5, 5, empty_threshold=0.9)
    assert masks.sum(axis=(1, 2)).tolist() == [0, 100, 0, 0]
    # None, or the threshold itself: the plain min-area rule
    plain = [100, 100, 100, 0]
    assert binarize(probs, 0.5, 5).sum(axis=(1, 2)).tolist() == plain
    assert binarize(probs, 0.5, 5, empty_threshold=0.5).sum(axis=(1, 2)).tolist() == plain
    # min area 0 never empties, whatever the empty threshold
    assert binarize(probs, 0.5, 0, empty_threshold=0.99).sum(axis=(1, 2)).tolist() == plain
    # forced empties still win
    forced = binarize(probs, 0.5, 5, empty_mask=np.array([False, True, False, False]), empty_threshold=0.9)
    assert not forced.any()


def test_binarize_takes_the_empty_threshold_exactly_too():
    probs = np.zeros((1, 101, 101), np.float16)
    probs[0, :10, :10] = 0.35
    probs[0, :3, :3] = 0.42  # float16 0.419921875: above 0.4199, not above 0.42
    for dtype in (np.float16, np.float32):
        assert binarize(probs.astype(dtype), 0.3, 9, empty_threshold=0.4199).sum() == 100
        assert binarize(probs.astype(dtype), 0.3, 9, empty_threshold=0.42).sum() == 0


# ---------------------------------------------------------------- submit_run


def test_submission_has_one_checked_row_per_test_image(run, synth_data, capsys):
    from pipeline.rle import read_rle_csv

    path = submit_run(run)
    assert path.as_posix() == "submissions/fake.csv"
    assert path.read_text().splitlines()[0] == "id,rle_mask"
    frame = read_rle_csv(path)
    assert frame["id"].tolist() == (run / "test_ids.txt").read_text().split()
    assert sorted(frame["id"]) == sorted(list_test_ids(synth_data))
    assert check_submission(path, synth_data) == len(list_test_ids(synth_data))
    assert "30 rows" in capsys.readouterr().out


def test_submission_masks_are_the_tuned_binarisation_of_test_probs(good_csv, tuned_run):
    from pipeline.rle import decode_many, read_rle_csv

    frame = read_rle_csv(good_csv)
    probs = np.load(tuned_run / "test_probs.npy").astype(np.float32)
    expected = binarize(probs, 0.4, 10)
    np.testing.assert_array_equal(decode_many(frame["rle_mask"].tolist()), expected)
    assert 0 < expected.any(axis=(1, 2)).sum() < len(expected)  # some salt, some empty


def test_submission_applies_the_tuned_empty_threshold(run, capsys):
    from pipeline.rle import decode_many, read_rle_csv

    tune = json.loads((run / "tune.json").read_text())
    (run / "tune.json").write_text(json.dumps({**tune, "empty_threshold": 0.9}))
    frame = read_rle_csv(submit_run(run))
    probs = np.load(run / "test_probs.npy")
    expected = binarize(probs, 0.4, 10, empty_threshold=0.9)
    np.testing.assert_array_equal(decode_many(frame["rle_mask"].tolist()), expected)
    # the test salt sits around 0.7: hardly a pixel above 0.9, so every mask is emptied
    assert binarize(probs, 0.4, 10).any() and not expected.any()
    assert "threshold 0.40, empty threshold 0.90, min area 10" in capsys.readouterr().out


def test_blank_test_images_are_emptied_when_tune_says_so(run, synth_data, tmp_path):
    from pipeline.data import write_image_png
    from pipeline.rle import read_rle_csv

    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    ids = (run / "test_ids.txt").read_text().split()
    write_image_png(data / "test" / "images" / f"{ids[0]}.png", np.full((101, 101), 7, np.uint8))
    tune = json.loads((run / "tune.json").read_text())
    (run / "tune.json").write_text(json.dumps({**tune, "empty_blank": True}))
    # as if predicted from this very test set (other pixels than the run's are refused)
    from pipeline.data import fingerprint_data
    meta = json.loads((run / "predict.json").read_text())
    (run / "predict.json").write_text(json.dumps({**meta, "test_fingerprint": fingerprint_data(data, "test")}))
    frame = read_rle_csv(submit_run(run, data_dir=data)).set_index("id")
    assert frame.loc[ids[0], "rle_mask"] == ""
    assert frame.loc[ids[2], "rle_mask"] != ""  # a non-blank image with salt keeps it


def test_submit_without_tune_json_says_to_run_tune(run):
    (run / "tune.json").unlink()
    with pytest.raises(PipelineError) as exc:
        submit_run(run)
    assert one_line(exc) == f"{run / 'tune.json'}: missing — run `python -m pipeline tune --run {run}`"


def test_submit_without_test_probs_says_to_run_predict(run):
    (run / "test_probs.npy").unlink()
    with pytest.raises(PipelineError) as exc:
        submit_run(run)
    assert one_line(exc) == f"{run / 'test_probs.npy'}: missing — run `python -m pipeline predict --run {run}`"


def test_submit_refuses_predictions_made_for_other_test_images(run, synth_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    (data / "test" / "images" / f"{list_test_ids(synth_data)[0]}.png").unlink()
    with pytest.raises(PipelineError) as exc:
        submit_run(run, data_dir=data)
    assert "test_ids.txt: 1 ids differ" in one_line(exc) and "predict" in str(exc.value)


# ---------------------------------------------------------------- check_submission


def rewrite(good_csv, tmp_path, edit) -> str:
    lines = good_csv.read_text().splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(edit(lines)) + "\n")
    return str(bad)


def with_rle(rle):
    return lambda lines: [lines[0], lines[1].split(",")[0] + "," + rle] + lines[2:]


BAD_FILES = {
    "missing id": (lambda lines: lines[:-1], "1 test images"),
    "extra id": (lambda lines: lines + ["notatestid,"], "1 ids are not images"),
    "duplicate id": (lambda lines: lines + [lines[1]], "duplicate"),
    "bad header": (lambda lines: ["id,mask"] + lines[1:], "header"),
    "odd rle count": (with_rle("1 2 5"), "bad RLE"),
    "overlapping runs": (with_rle("1 10 5 10"), "bad RLE"),
    "run past the image": (with_rle("10200 10"), "bad RLE"),
}


@pytest.mark.parametrize("problem", BAD_FILES)
def test_check_submission_names_the_first_problem_in_one_line(good_csv, synth_data, tmp_path, problem):
    edit, expected = BAD_FILES[problem]
    bad = rewrite(good_csv, tmp_path, edit)
    with pytest.raises(PipelineError) as exc:
        check_submission(bad, synth_data)
    message = one_line(exc)
    assert "bad.csv" in message and expected in message


def test_check_submission_counts_the_bad_rows_after_the_first(good_csv, synth_data, tmp_path):
    def two_bad(lines):
        return [lines[0]] + [line.split(",")[0] + ",1 2 3" for line in lines[1:3]] + lines[3:]

    with pytest.raises(PipelineError) as exc:
        check_submission(rewrite(good_csv, tmp_path, two_bad), synth_data)
    assert one_line(exc).endswith("(and 1 more bad rows)")


def test_check_submission_accepts_the_images_folder_itself(good_csv, synth_data):
    assert check_submission(good_csv, synth_data / "test" / "images") == 30


def test_check_submission_compares_with_sample_submission(good_csv, synth_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    ids = list_test_ids(synth_data)
    (data / "sample_submission.csv").write_text("id,rle_mask\n" + "".join(f"{i},1 1\n" for i in ids[1:]))
    with pytest.raises(PipelineError) as exc:
        check_submission(good_csv, data)
    assert f"1 ids differ from {data / 'sample_submission.csv'} (e.g. {ids[0]})" in one_line(exc)


def test_check_submission_without_test_folder_is_one_line(good_csv, tmp_path):
    with pytest.raises(PipelineError) as exc:
        check_submission(good_csv, tmp_path / "nowhere")
    assert "nowhere: no such test folder" in one_line(exc)


def test_check_submission_on_the_real_test_ids(tgs_sample, tmp_path):
    from pipeline.rle import write_rle_csv

    ids = list_test_ids(tgs_sample)
    csv = tmp_path / "real.csv"
    write_rle_csv(csv, ids, ["1 101"] * len(ids))
    assert check_submission(csv, tgs_sample) == len(ids) == 1000


# ---------------------------------------------------------------- CLI


def test_cli_submit_and_check_submission(run, synth_data, capsys):
    from pipeline.cli import main

    assert main(["submit", "--run", str(run)]) == 0
    assert "wrote submissions/fake.csv" in capsys.readouterr().out
    assert main(["check-submission", "--csv", "submissions/fake.csv", "--test", str(synth_data)]) == 0
    assert "valid submission, 30 rows" in capsys.readouterr().out
    (run / "tune.json").unlink()
    assert main(["submit", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python -m pipeline tune" in err
