"""Folds are stratified by coverage class, reproducible per seed, and validated on load."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pandas as pd
import pytest

from pipeline import data
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.folds import coverage_class, fold_summary, load_folds, make_folds, make_folds_for_dir


def _mask_with_pixels(n_pixels: int) -> np.ndarray:
    mask = np.zeros(101 * 101, dtype=bool)
    mask[:n_pixels] = True
    return mask.reshape(101, 101)


@pytest.mark.parametrize(
    ("salt_pixels", "expected_class"),
    [(0, 0), (1, 1), (1020, 1), (1021, 2), (5100, 5), (5101, 6), (9180, 9), (9181, 10), (10200, 10), (10201, 10)],
)
def test_coverage_class_is_empty_or_decile_plus_one(salt_pixels, expected_class):
    # 1020/10201 < 10% <= 1021/10201; a full mask (coverage 1.0) stays in class 10
    assert coverage_class(_mask_with_pixels(salt_pixels)[None]).tolist() == [expected_class]


@pytest.fixture(scope="module")
def real_folds(tgs_sample, tmp_path_factory):
    return make_folds_for_dir(tgs_sample, k=5, seed=42, out=tmp_path_factory.mktemp("folds") / "folds.csv")


def test_folds_are_stratified_on_the_real_sample(real_folds):
    assert len(real_folds) == 3001 and real_folds["id"].tolist() == sorted(real_folds["id"])
    assert list(real_folds.columns) == ["id", "fold", "coverage_class"]
    sizes = real_folds["fold"].value_counts()
    assert sorted(sizes.index) == [0, 1, 2, 3, 4] and sizes.max() - sizes.min() <= 5
    empty = real_folds["coverage_class"] == 0
    whole_empty_fraction = empty.mean()
    assert whole_empty_fraction == pytest.approx(0.39, abs=0.005)
    for fold in range(5):
        in_fold = real_folds["fold"] == fold
        assert empty[in_fold].mean() == pytest.approx(whole_empty_fraction, abs=0.02)
        # every coverage class is spread over the folds too, not only the empty ones
        assert real_folds.loc[in_fold, "coverage_class"].mean() == pytest.approx(
            real_folds["coverage_class"].mean(), abs=0.1)


def test_same_seed_gives_identical_file_other_seed_differs(synth_data, tmp_path):
    make_folds_for_dir(synth_data, k=5, seed=42, out=tmp_path / "a.csv")
    make_folds_for_dir(synth_data, k=5, seed=42, out=tmp_path / "b.csv")
    make_folds_for_dir(synth_data, k=5, seed=43, out=tmp_path / "c.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.csv").read_bytes() != (tmp_path / "c.csv").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv", "c.csv"]  # no temp files


def test_folds_do_not_depend_on_the_order_ids_are_given(synth_data):
    train = data.load_train(synth_data)
    shuffled = np.random.default_rng(0).permutation(len(train))
    in_order = make_folds(train.ids, train.masks, k=4, seed=1)
    reordered = make_folds([train.ids[i] for i in shuffled], train.masks[shuffled], k=4, seed=1)
    pd.testing.assert_frame_equal(in_order, reordered)


def test_small_coverage_classes_are_merged_without_sklearn_warnings():
    # classes 0 x10, 1 x2, 5 x1, 10 x7: two classes have fewer members than k=5
    pixel_counts = [0] * 10 + [50] * 2 + [4500] + [10201] * 7
    masks = np.stack([_mask_with_pixels(n) for n in pixel_counts])
    ids = [f"id{i:02d}" for i in range(len(masks))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folds = make_folds(ids, masks, k=5, seed=0)
    assert folds["coverage_class"].value_counts().to_dict() == {0: 10, 10: 7, 1: 2, 5: 1}
    assert sorted(folds["fold"].value_counts().tolist()) == [4, 4, 4, 4, 4]
    empty_per_fold = folds[folds["coverage_class"] == 0].groupby("fold").size()
    assert empty_per_fold.tolist() == [2, 2, 2, 2, 2]


def test_more_folds_than_images_is_an_error():
    with pytest.raises(PipelineError, match="k=5 folds need at least 5 train images, got 3"):
        make_folds(["a", "b", "c"], np.zeros((3, 101, 101), dtype=bool), k=5)


def test_folds_come_from_train_csv_when_masks_are_absent(synth_data, tmp_path):
    copy = tmp_path / "data"
    copy.mkdir()
    shutil.copy(synth_data / "train.csv", copy / "train.csv")
    from_csv = make_folds_for_dir(copy, k=5, seed=3, out=tmp_path / "csv.csv")
    from_pngs = make_folds_for_dir(synth_data, k=5, seed=3, out=tmp_path / "png.csv")
    pd.testing.assert_frame_equal(from_csv, from_pngs)


def test_a_train_csv_with_fewer_rows_than_folds_is_named_with_its_row_count(synth_data, tmp_path, capsys):
    # the images are all there; what is short is train.csv (no train/masks: folds come from it)
    copy = tmp_path / "data"
    shutil.copytree(synth_data / "train" / "images", copy / "train" / "images")
    lines = (synth_data / "train.csv").read_text().splitlines(keepends=True)
    (copy / "train.csv").write_text("".join(lines[:2]))

    assert main(["folds", "--data", str(copy), "--k", "5", "--out", str(tmp_path / "f.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {copy / 'train.csv'}: 1 row, too few for k=5 folds"), err
    assert "train images" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "f.csv").exists()


def test_no_masks_and_no_train_csv_is_an_error(tmp_path):
    with pytest.raises(PipelineError, match="no train/masks folder or train.csv"):
        make_folds_for_dir(tmp_path, k=5, seed=0, out=tmp_path / "f.csv")


def test_load_folds_returns_the_written_folds(synth_data, tmp_path):
    written = make_folds_for_dir(synth_data, k=5, seed=0, out=tmp_path / "f.csv")
    ids = data.list_image_ids(synth_data / "train" / "images")
    pd.testing.assert_frame_equal(load_folds(tmp_path / "f.csv", ids), written)


def test_load_folds_names_the_train_ids_without_a_fold(tmp_path):
    (tmp_path / "folds.csv").write_text("id,fold,coverage_class\naaa,0,0\nbbb,1,3\n")
    with pytest.raises(PipelineError) as info:
        load_folds(tmp_path / "folds.csv", ["aaa", "ccc", "ddd"])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'folds.csv'}: 2 train ids have no fold (e.g. ccc)")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("image,fold\naaa,0\n", "no 'id' column"),
        ("id,split\naaa,0\n", "no 'fold' column"),
        ("id,fold\naaa,zero\n", "id aaa has fold 'zero', expected a non-negative integer"),
        ("id,fold\naaa,-1\n", "id aaa has fold '-1'"),
        ("id,fold\naaa,0\naaa,1\n", "id aaa appears more than once"),
        ("", "empty file"),
    ],
    ids=["no-id", "no-fold", "text-fold", "negative-fold", "duplicate", "empty"],
)
def test_bad_folds_file_is_one_line_error(tmp_path, content, expected):
    path = tmp_path / "folds.csv"
    path.write_text(content)
    with pytest.raises(PipelineError) as info:
        load_folds(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value) and expected in str(info.value)


def test_missing_folds_file_is_named(tmp_path):
    with pytest.raises(PipelineError, match="folds file not found"):
        load_folds(tmp_path / "nope.csv")


def test_cli_folds_writes_the_file_and_prints_a_summary(synth_data, tmp_path, capsys):
    out = tmp_path / "folds" / "synth.csv"
    assert main(["folds", "--data", str(synth_data), "--k", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    folds = load_folds(out)
    assert len(folds) == 120 and sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]
    assert f"wrote {out}" in printed
    for fold in range(5):
        assert f"\n{fold:>4}  " in printed


def test_fold_summary_counts_images_and_empty_share():
    folds = pd.DataFrame({"id": list("abcdef"), "fold": [0, 0, 0, 1, 1, 1], "coverage_class": [0, 0, 4, 0, 2, 10]})
    lines = fold_summary(folds).splitlines()
    assert lines[0].split() == ["fold", "images", "empty", "mean", "class"]
    assert lines[1].split() == ["0", "3", "66.7%", "1.33"]
    assert lines[2].split() == ["1", "3", "33.3%", "4.00"]
    assert lines[3].split() == ["all", "6", "50.0%", "2.67"]
