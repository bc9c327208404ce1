"""Reading the competition's PNGs and CSVs: the real sample loads exactly, bad files fail in one line."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline import data
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.rle import decode_many, read_rle_csv, write_rle_csv


@pytest.fixture(scope="module")
def real_train(tgs_sample):
    return data.load_train(tgs_sample)


def _tiny_dataset(root, n: int = 3) -> list[str]:
    """A minimal dataset in the Kaggle layout: n images, masks, train.csv, depths.csv."""
    rng = np.random.default_rng(0)
    ids = [f"{i:010x}" for i in range(n)]
    masks = np.zeros((n, 101, 101), dtype=bool)
    masks[1:, 40:, :30] = True
    for image_id, mask in zip(ids, masks):
        data.write_image_png(root / "train" / "images" / f"{image_id}.png", rng.integers(0, 256, (101, 101), dtype=np.uint8))
        data.write_mask_png(root / "train" / "masks" / f"{image_id}.png", mask, sixteen_bit=bool(mask.any()))
    from pipeline.rle import encode_many

    write_rle_csv(root / "train.csv", ids, encode_many(masks))
    (root / "depths.csv").write_text("id,z\n" + "".join(f"{i},{100 + k}\n" for k, i in enumerate(ids)))
    return ids


def _assert_one_line_error(info: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# ---------------------------------------------------------------- the real sample


def test_load_train_reads_the_real_sample(real_train, tgs_sample):
    assert len(real_train) == 3001
    assert real_train.ids == sorted(real_train.ids)
    assert set(real_train.ids) == set(read_rle_csv(tgs_sample / "train.csv")["id"])
    assert real_train.images.dtype == np.uint8 and real_train.images.shape == (3001, 101, 101)
    assert real_train.masks.dtype == np.bool_ and real_train.masks.shape == (3001, 101, 101)
    empty_fraction = 1 - real_train.masks.any(axis=(1, 2)).mean()
    assert empty_fraction == pytest.approx(0.39, abs=0.005)
    assert real_train.depths.dtype == np.float32 and np.isfinite(real_train.depths).all()
    assert 50 <= real_train.depths.min() and real_train.depths.max() <= 1000


def test_mask_pngs_equal_kaggle_train_csv_rows(real_train, tgs_sample):
    table = read_rle_csv(tgs_sample / "train.csv").set_index("id").loc[real_train.ids]
    decoded = decode_many(table["rle_mask"].tolist(), ids=real_train.ids, where="train.csv")
    assert np.array_equal(decoded, real_train.masks)


def test_the_real_sample_masks_agree_with_train_csv(real_train, tgs_sample):
    assert data.masks_differing_from_train_csv(tgs_sample, real_train) == ([], 3001)


def test_sixteen_bit_mask_reads_as_salt_without_dividing(real_train, tgs_sample):
    index = int(np.argmax(real_train.masks.any(axis=(1, 2))))
    path = tgs_sample / "train" / "masks" / f"{real_train.ids[index]}.png"
    with Image.open(path) as image:
        assert image.mode == "I;16"
        raw = np.asarray(image)
    assert set(np.unique(raw).tolist()) <= {0, 65535}
    assert np.array_equal(data.read_mask(path), raw == 65535)
    assert data.read_mask(path).any()


def test_read_image_takes_one_channel_of_the_rgb_png(real_train, tgs_sample):
    path = tgs_sample / "train" / "images" / f"{real_train.ids[0]}.png"
    with Image.open(path) as image:
        assert image.mode == "RGB"
        rgb = np.asarray(image)
    assert np.array_equal(rgb[..., 0], rgb[..., 2])
    assert np.array_equal(data.read_image(path), rgb[..., 0])
    assert np.array_equal(real_train.images[0], rgb[..., 0])


def test_blank_images_are_flat_and_have_empty_masks(real_train):
    blank = data.is_blank(real_train.images)
    assert blank.mean() == pytest.approx(0.02, abs=0.005)
    assert not real_train.masks[blank].any()
    assert not data.is_blank(real_train.images[~blank]).any()


def test_load_test_reads_sorted_test_ids_with_depths(tgs_sample):
    test = data.load_test(tgs_sample)
    assert len(test) == 1000 and test.ids == sorted(test.ids)
    assert test.images.dtype == np.uint8 and test.images.shape == (1000, 101, 101)
    assert np.isfinite(test.depths).all()


def test_encoding_the_real_mask_folder_reproduces_train_csv(tgs_sample, tmp_path):
    out = tmp_path / "encoded.csv"
    assert data.encode_mask_dir(tgs_sample / "train" / "masks", out) == 3001
    ours = read_rle_csv(out).set_index("id")["rle_mask"]
    kaggle = read_rle_csv(tgs_sample / "train.csv").set_index("id")["rle_mask"]
    assert ours.index.tolist() == sorted(kaggle.index)
    assert ours.to_dict() == kaggle.to_dict()


# ---------------------------------------------------------------- formats


def test_sixteen_bit_image_is_scaled_to_uint8(tmp_path):
    values = np.arange(101 * 101, dtype=np.int64).reshape(101, 101) % 256
    path = tmp_path / "wide.png"
    Image.fromarray((values * 257).astype(np.uint16)).save(path)
    assert np.array_equal(data.read_image(path), values)


def test_masks_in_255_and_65535_read_alike(tmp_path):
    mask = np.zeros((101, 101), dtype=bool)
    mask[10:60, 5:20] = True
    data.write_mask_png(tmp_path / "eight.png", mask)
    data.write_mask_png(tmp_path / "sixteen.png", mask, sixteen_bit=True)
    with Image.open(tmp_path / "eight.png") as eight, Image.open(tmp_path / "sixteen.png") as sixteen:
        assert (eight.mode, sixteen.mode) == ("L", "I;16")
        assert np.asarray(eight).max() == 255 and np.asarray(sixteen).max() == 65535
    assert np.array_equal(data.read_mask(tmp_path / "eight.png"), mask)
    assert np.array_equal(data.read_mask(tmp_path / "sixteen.png"), mask)


def test_written_image_is_rgb_with_equal_channels(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (101, 101), dtype=np.uint8)
    data.write_image_png(tmp_path / "x.png", image)
    with Image.open(tmp_path / "x.png") as written:
        assert written.mode == "RGB"
    assert np.array_equal(data.read_image(tmp_path / "x.png"), image)


def test_rle_cli_decodes_to_8bit_pngs_and_encodes_back(tmp_path, capsys):
    ids = _tiny_dataset(tmp_path / "d")
    assert main(["rle", "decode", "--csv", str(tmp_path / "d" / "train.csv"), "--out", str(tmp_path / "masks")]) == 0
    assert sorted(p.stem for p in (tmp_path / "masks").iterdir()) == ids
    with Image.open(tmp_path / "masks" / f"{ids[1]}.png") as decoded:
        assert decoded.mode == "L" and set(np.unique(np.asarray(decoded)).tolist()) == {0, 255}
    assert main(["rle", "encode", "--masks", str(tmp_path / "masks"), "--out", str(tmp_path / "again.csv")]) == 0
    assert (tmp_path / "again.csv").read_text() == (tmp_path / "d" / "train.csv").read_text()
    assert "decoded 3 masks" in capsys.readouterr().out


def test_decode_refuses_an_id_that_is_not_a_file_name(tmp_path):
    write_rle_csv(tmp_path / "evil.csv", ["../escape"], ["1 1"])
    with pytest.raises(PipelineError) as info:
        data.decode_csv_to_dir(tmp_path / "evil.csv", tmp_path / "out")
    _assert_one_line_error(info, "evil.csv", "cannot be a file name")
    assert not (tmp_path / "escape.png").exists()


def test_load_train_decodes_train_csv_when_the_mask_folder_is_absent(tmp_path):
    _tiny_dataset(tmp_path)
    from_pngs = data.load_train(tmp_path)
    shutil.rmtree(tmp_path / "train" / "masks")
    from_csv = data.load_train(tmp_path)
    assert np.array_equal(from_csv.masks, from_pngs.masks)
    assert from_pngs.depths.tolist() == [100.0, 101.0, 102.0]


def _disagreeing_dataset(root) -> list[str]:
    """_tiny_dataset(6) whose train.csv disagrees with two masks: ids[0]'s PNG was redrawn, ids[2]'s
    row is malformed; ids[1]'s row is the same mask spaced otherwise and ids[5] has no row."""
    ids = _tiny_dataset(root, n=6)
    data.write_mask_png(root / "train" / "masks" / f"{ids[0]}.png", np.ones((101, 101), dtype=bool))
    table = read_rle_csv(root / "train.csv")
    rles = table["rle_mask"].tolist()
    rles[1] = "  " + rles[1].replace(" ", "   ") + " "
    rles[2] = "1 2 3"
    write_rle_csv(root / "train.csv", ids[:5], rles[:5])
    return ids


def test_masks_that_differ_from_train_csv_are_counted(tmp_path):
    ids = _disagreeing_dataset(tmp_path)
    train = data.load_train(tmp_path)
    assert train.masks[0].all(), "the PNG masks are the ones used"
    assert data.masks_differing_from_train_csv(tmp_path, train) == ([ids[0], ids[2]], 5)
    shutil.rmtree(tmp_path / "train" / "masks")  # masks from train.csv: nothing to compare
    assert data.masks_differing_from_train_csv(tmp_path, train) == ([], 0)


def test_training_says_once_when_train_csv_disagrees_with_the_masks(tmp_path, capsys):
    from pipeline.config import Config
    from pipeline.train_folds import load_training_data

    ids = _disagreeing_dataset(tmp_path / "data")
    folds = tmp_path / "folds.csv"  # written here: making folds would import sklearn (seconds)
    folds.write_text("id,fold\n" + "".join(f"{image_id},{k % 2}\n" for k, image_id in enumerate(ids)))
    cfg = Config(name="x", data=str(tmp_path / "data"), folds_csv=str(folds), n_folds=2)
    load_training_data(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"note: 2 of 5 masks in {tmp_path / 'data' / 'train' / 'masks'} differ from "
                   f"{tmp_path / 'data' / 'train.csv'}'s rle_mask (e.g. {ids[0]}); the PNG masks are used"]
    load_training_data(cfg, notes=False)  # a fold process: its parent said it
    assert capsys.readouterr().err == ""
    _tiny_dataset(tmp_path / "agreeing", n=6)
    load_training_data(Config(name="y", data=str(tmp_path / "agreeing"), folds_csv=str(folds), n_folds=2))
    assert capsys.readouterr().err == ""


def test_missing_depths_file_gives_nan_depths(tmp_path):
    _tiny_dataset(tmp_path)
    (tmp_path / "depths.csv").unlink()
    assert np.isnan(data.load_train(tmp_path).depths).all()


# ---------------------------------------------------------------- bad inputs


def _png_bytes_of_size(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def _noise_png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (101, 101), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (101, 101)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (_noise_png_bytes()[:2000], "not a readable PNG ("),
        (_png_bytes_of_size(100, 101), "image is 100x101, expected 101x101"),
        (_jpeg_bytes(), "not a readable PNG (it is a JPEG file)"),
        (b"id,rle_mask\n", "not a readable PNG (not an image file)"),
        (b"", "not a readable PNG (empty file)"),
    ],
    ids=["truncated", "wrong-size", "jpeg", "text", "empty"],
)
def test_bad_png_is_one_line_error_naming_the_file(tmp_path, content, expected):
    path = tmp_path / "abc.png"
    path.write_bytes(content)
    for reader in (data.read_image, data.read_mask):
        with pytest.raises(PipelineError) as info:
            reader(path)
        _assert_one_line_error(info, str(path), expected)


def test_missing_png_is_one_line_error(tmp_path):
    with pytest.raises(PipelineError) as info:
        data.read_image(tmp_path / "nope.png")
    _assert_one_line_error(info, "nope.png: not a readable PNG (file not found)")


def test_truncated_png_inside_a_dataset_names_that_file(tmp_path):
    ids = _tiny_dataset(tmp_path)
    bad = tmp_path / "train" / "images" / f"{ids[1]}.png"
    bad.write_bytes(bad.read_bytes()[:-300])
    with pytest.raises(PipelineError) as info:
        data.load_train(tmp_path)
    _assert_one_line_error(info, f"train/images/{ids[1]}.png: not a readable PNG")


def test_missing_mask_is_named(tmp_path):
    ids = _tiny_dataset(tmp_path)
    (tmp_path / "train" / "masks" / f"{ids[2]}.png").unlink()
    with pytest.raises(PipelineError) as info:
        data.load_train(tmp_path)
    _assert_one_line_error(info, f"train/masks/{ids[2]}.png: missing mask for image {ids[2]}")


def test_train_csv_id_without_an_image_is_named(tmp_path):
    ids = _tiny_dataset(tmp_path)
    (tmp_path / "train" / "images" / f"{ids[0]}.png").unlink()
    (tmp_path / "train" / "masks" / f"{ids[0]}.png").unlink()
    with pytest.raises(PipelineError) as info:
        data.load_train(tmp_path)
    _assert_one_line_error(info, f"train.csv: id {ids[0]} has no image train/images/{ids[0]}.png")


def test_train_csv_without_header_is_an_error(tmp_path):
    _tiny_dataset(tmp_path)
    csv = tmp_path / "train.csv"
    csv.write_text("".join(csv.read_text().splitlines(keepends=True)[1:]))
    with pytest.raises(PipelineError) as info:
        data.load_train(tmp_path)
    _assert_one_line_error(info, "train.csv: header is")


@pytest.mark.parametrize(
    ("depths_text", "expected"),
    [
        ("id,z\n{0},\n", "depths.csv: id {0} has z '', expected a number"),
        ("id,z\n{0},NaN\n", "depths.csv: id {0} has z 'NaN', expected a number"),
        ("id,z\n{0},deep\n", "depths.csv: id {0} has z 'deep', expected a number"),
        ("{0},120\n", "depths.csv: header is '{0},120', expected 'id,z'"),
        ("id,z\n{0},1\n{0},2\n", "depths.csv: id {0} appears more than once"),
        ("", "depths.csv: empty file"),
    ],
    ids=["empty-z", "nan-z", "text-z", "no-header", "duplicate", "empty-file"],
)
def test_bad_depths_csv_names_file_and_id(tmp_path, depths_text, expected):
    ids = _tiny_dataset(tmp_path)
    (tmp_path / "depths.csv").write_text(depths_text.format(ids[0]))
    with pytest.raises(PipelineError) as info:
        data.load_train(tmp_path)
    _assert_one_line_error(info, expected.format(ids[0]))


def test_missing_image_folder_is_named(tmp_path):
    with pytest.raises(PipelineError) as info:
        data.load_test(tmp_path)
    _assert_one_line_error(info, "test/images: folder not found")


def test_asking_for_an_id_without_image_is_named(tmp_path):
    _tiny_dataset(tmp_path)
    with pytest.raises(PipelineError) as info:
        data.load_train(tmp_path, ids=["0000000000", "ffffffffff"])
    _assert_one_line_error(info, "ffffffffff.png: no image for id ffffffffff")
    subset = data.load_train(tmp_path, ids=["0000000002", "0000000000"])
    assert subset.ids == ["0000000002", "0000000000"]
    assert subset.masks[0].any() and not subset.masks[1].any()
