"""The synthetic dataset has the competition's layout, file formats and statistics, per seed."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import data
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.rle import decode_many, read_rle_csv
from pipeline.synth import generate


def _png_kind(path: Path) -> tuple[str, int, int, int]:
    """(Pillow mode, IHDR bit depth, colour type, size) — what distinguishes the PNG flavours."""
    header = path.read_bytes()[:29]
    _, _, bit_depth, colour_type = struct.unpack(">IIBB", header[16:26])
    with Image.open(path) as image:
        return image.mode, bit_depth, colour_type, image.size[0]


def _kinds(folder: Path, limit: int = 300) -> set:
    return {_png_kind(folder / f"{i}.png") for i in data.list_image_ids(folder)[:limit]}


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth_train(synth_data):
    return data.load_train(synth_data)


def test_layout_is_the_competition_layout(synth_data):
    assert sorted(os.listdir(synth_data)) == ["depths.csv", "sample_submission.csv", "test", "train", "train.csv"]
    assert len(data.list_image_ids(synth_data / "train" / "images")) == 120
    assert data.list_image_ids(synth_data / "train" / "masks") == data.list_image_ids(synth_data / "train" / "images")
    assert len(data.list_image_ids(synth_data / "test" / "images")) == 30
    leftovers = [p for p in synth_data.parent.iterdir() if p.name.startswith(f".{synth_data.name}.")]
    assert not leftovers  # the hidden staging folder was renamed into place


def test_png_formats_match_the_real_sample(synth_data, tgs_sample):
    for folder in ("train/images", "train/masks", "test/images"):
        assert _kinds(synth_data / folder) == _kinds(tgs_sample / folder), folder


def test_empty_masks_are_8bit_zeros_and_salt_masks_16bit(synth_data, synth_train):
    assert _kinds(synth_data / "train" / "images") == {("RGB", 8, 2, 101)}
    for image_id, mask in zip(synth_train.ids, synth_train.masks):
        path = synth_data / "train" / "masks" / f"{image_id}.png"
        with Image.open(path) as image:
            values = set(np.unique(np.asarray(image)).tolist())
            if mask.any():
                assert image.mode == "I;16" and values <= {0, 65535}
            else:
                assert image.mode == "L" and values == {0}


def test_images_store_three_equal_channels(synth_data, synth_train):
    with Image.open(synth_data / "train" / "images" / f"{synth_train.ids[0]}.png") as image:
        rgb = np.asarray(image)
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])


def test_train_csv_decodes_to_the_mask_pngs(synth_data, synth_train):
    table = read_rle_csv(synth_data / "train.csv")
    assert sorted(table["id"]) == synth_train.ids
    by_id = table.set_index("id").loc[synth_train.ids]
    assert np.array_equal(decode_many(by_id["rle_mask"].tolist()), synth_train.masks)


def test_masks_look_like_the_real_ones(synth_train):
    has_salt = synth_train.masks.any(axis=(1, 2))
    assert 1 - has_salt.mean() == pytest.approx(0.39, abs=0.01)
    salt = synth_train.masks[has_salt]
    touches_border = salt[:, 0].any(1) | salt[:, -1].any(1) | salt[:, :, 0].any(1) | salt[:, :, -1].any(1)
    assert touches_border.mean() > 0.8
    coverage = salt.mean(axis=(1, 2))
    assert (coverage < 0.1).any() and (coverage > 0.7).any()
    blank = data.is_blank(synth_train.images)
    assert blank.sum() == 2 and not synth_train.masks[blank].any()


def test_salt_texture_is_weaker_than_the_layered_sediments(synth_train):
    # what a model can learn: vertical gradients are strong across reflectors, weak in salt
    gradient = np.abs(np.diff(synth_train.images.astype(np.float32), axis=1))
    in_salt = synth_train.masks[:, 1:] & synth_train.masks[:, :-1]
    sediment = ~synth_train.masks[:, 1:] & ~synth_train.masks[:, :-1] & ~data.is_blank(synth_train.images)[:, None, None]
    assert gradient[in_salt].mean() < 0.7 * gradient[sediment].mean()


def test_ids_depths_and_sample_submission_are_kaggle_like(synth_data, synth_train):
    test_ids = data.list_image_ids(synth_data / "test" / "images")
    all_ids = synth_train.ids + test_ids
    assert all(re.fullmatch(r"[0-9a-f]{10}", i) for i in all_ids) and len(set(all_ids)) == 150
    depths = pd.read_csv(synth_data / "depths.csv", dtype={"id": str})
    assert list(depths.columns) == ["id", "z"] and sorted(depths["id"]) == sorted(all_ids)
    assert depths["z"].between(50, 959).all()
    sample = read_rle_csv(synth_data / "sample_submission.csv")
    assert sorted(sample["id"]) == test_ids and set(sample["rle_mask"]) == {"1 1"}
    assert np.isfinite(data.load_test(synth_data).depths).all()


def test_same_seed_writes_identical_files_other_seed_differs(tmp_path):
    generate(tmp_path / "a", n_train=12, n_test=4, seed=7)
    generate(tmp_path / "b", n_train=12, n_test=4, seed=7)
    generate(tmp_path / "c", n_train=12, n_test=4, seed=8)
    first = _all_files(tmp_path / "a")
    assert first == _all_files(tmp_path / "b")
    assert (tmp_path / "a" / "train.csv").read_bytes() != (tmp_path / "c" / "train.csv").read_bytes()


def test_regenerating_replaces_a_dataset_but_not_a_foreign_folder(tmp_path):
    generate(tmp_path / "d", n_train=5, n_test=2, seed=1)
    generate(tmp_path / "d", n_train=6, n_test=0, seed=2)
    assert len(data.load_train(tmp_path / "d")) == 6
    assert data.list_image_ids(tmp_path / "d" / "test" / "images") == []
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="notes.txt"):
        generate(tmp_path / "d", n_train=5, n_test=2, seed=1)
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_cli_synth_writes_a_loadable_dataset(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--n-train", "10", "--n-test", "3", "--seed", "4"]) == 0
    assert "10 train, 3 test" in capsys.readouterr().out
    assert len(data.load_train(out)) == 10 and len(data.load_test(out)) == 3
    assert main(["synth", "--out", str(tmp_path / "x"), "--n-train", "0"]) == 2
    assert "n_train must be at least 1" in capsys.readouterr().err
