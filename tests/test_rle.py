"""RLE: Kaggle's exact format (checked against the real train.csv), strict decoding, CSV files."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline import rle
from pipeline.cli import main
from pipeline.errors import PipelineError


def read_png_mask(path) -> np.ndarray:
    # Kaggle's masks are 8-bit zeros (empty) or 16-bit 0/65535: any non-zero is salt.
    return np.asarray(Image.open(path)) != 0


@pytest.fixture(scope="module")
def real_masks(tgs_sample):
    """(train.csv table, PNG masks in train.csv's row order)."""
    table = rle.read_rle_csv(tgs_sample / "train.csv")
    masks = np.stack([read_png_mask(tgs_sample / "train" / "masks" / f"{i}.png") for i in table["id"]])
    return table, masks


def assert_one_line_error(excinfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# ---------------------------------------------------------------- the real sample


def test_rle_roundtrip_matches_kaggle_train_csv_byte_for_byte(real_masks, tgs_sample, tmp_path):
    table, masks = real_masks
    out = tmp_path / "train.csv"
    rle.write_rle_csv(out, table["id"].tolist(), rle.encode_many(masks))
    assert out.read_bytes() == (tgs_sample / "train.csv").read_bytes()


def test_decoding_every_train_csv_row_reproduces_its_mask_png(real_masks):
    table, masks = real_masks
    decoded = rle.decode_many(table["rle_mask"].tolist(), ids=table["id"].tolist(), where="train.csv")
    assert decoded.dtype == bool and decoded.shape == masks.shape
    mismatched = [image_id for image_id, a, b in zip(table["id"], decoded, masks) if not np.array_equal(a, b)]
    assert mismatched == []
    assert 0 < decoded.any(axis=(1, 2)).mean() < 1  # both empty and salty masks were covered


def test_single_mask_encode_decode_agree_with_batch_on_real_masks(real_masks):
    table, masks = real_masks
    for index in range(0, len(masks), 97):
        assert rle.encode(masks[index]) == table["rle_mask"][index]
        assert np.array_equal(rle.decode(table["rle_mask"][index]), masks[index])


def test_read_rle_csv_keeps_empty_masks_as_empty_strings(real_masks):
    table, _ = real_masks
    assert list(table.columns) == ["id", "rle_mask"]
    assert (table["rle_mask"] == "").sum() > 0
    assert not table["rle_mask"].isna().any()
    assert all(isinstance(value, str) for value in table["rle_mask"].head(50))


# ---------------------------------------------------------------- hand cases


def test_empty_mask_is_empty_string():
    assert rle.encode(np.zeros((101, 101), bool)) == ""
    assert not rle.decode("").any()
    assert not rle.decode("   ").any()


def test_full_mask_is_one_run_of_every_pixel():
    assert rle.encode(np.ones((101, 101), bool)) == "1 10201"
    assert rle.decode("1 10201").all()


def test_single_pixel_at_first_and_last_index():
    first = np.zeros((101, 101), bool)
    first[0, 0] = True
    last = np.zeros((101, 101), bool)
    last[-1, -1] = True
    assert rle.encode(first) == "1 1"
    assert rle.encode(last) == "10201 1"
    assert np.array_equal(rle.decode("1 1"), first)
    assert np.array_equal(rle.decode("10201 1"), last)


def test_pixels_are_numbered_down_columns_then_across():
    # 3 rows x 2 columns. Column-major numbering:  1 4
    #                                              2 5
    #                                              3 6
    toy = np.array([[0, 1],
                    [1, 0],
                    [1, 0]], dtype=bool)
    # Pixels 2, 3 (column 0) and 4 (top of column 1) form one run; row-major would be "2 2 5 1".
    assert rle.encode(toy) == "2 3"
    assert np.array_equal(rle.decode("2 3", shape=(3, 2)), toy)
    # The same string on a 2x3 grid wraps differently.
    assert np.array_equal(rle.decode("2 3", shape=(2, 3)), np.array([[0, 1, 0], [1, 1, 0]], dtype=bool))


def test_encode_accepts_uint8_and_16_bit_masks_as_nonzero_salt():
    mask16 = np.zeros((4, 4), np.uint16)
    mask16[1:3, 2] = 65535
    assert rle.encode(mask16) == rle.encode(mask16.astype(bool)) == "10 2"
    assert rle.encode(mask16.astype(bool).astype(np.uint8) * 255) == "10 2"


def test_encode_refuses_probabilities():
    with pytest.raises(TypeError, match="threshold"):
        rle.encode(np.full((4, 4), 0.7))


def test_touching_runs_and_loose_whitespace_decode():
    assert np.array_equal(rle.decode("1 2 3 2", shape=(3, 2)), np.array([[1, 1], [1, 0], [1, 0]], dtype=bool))
    assert np.array_equal(rle.decode("  2\t3 \n", shape=(3, 2)), rle.decode("2 3", shape=(3, 2)))


def test_encode_many_and_decode_many_keep_order_across_chunks():
    rng = np.random.default_rng(0)
    masks = rng.random((2100, 5, 7)) < 0.3  # more than one internal chunk of 1024
    masks[::7] = False
    rles = rle.encode_many(masks)
    assert rles[0] == rle.encode(masks[0]) and rles[2099] == rle.encode(masks[2099])
    assert np.array_equal(rle.decode_many(rles, shape=(5, 7)), masks)


# ---------------------------------------------------------------- strict decoding

BAD_RLE = [
    ("1 2 3", "odd number of values (3)"),
    ("1 x", "'x' is not an integer"),
    ("1.5 2", "'1.5' is not an integer"),
    ("1 +2", "'+2' is not an integer"),
    ("1 2\x00", "'2\\x00' is not an integer"),
    ("0 3", "run 1 starts at 0"),
    ("5 1 -1 3", "run 2 starts at -1"),
    ("5 0", "run 1 has length 0"),
    ("5 -2", "run 1 has length -2"),
    ("10200 5", "ends at pixel 10204, past the 10201 pixels of a 101x101 mask"),
    ("10202 1", "past the 10201 pixels"),
    ("99999999999999999 1", "past the 10201 pixels"),
    ("1" * 40 + " 1", "is too large"),
    ("1 9223372036854775808", "value '9223372036854775808' is too large"),
    ("5 9223372036854775807", "past the 10201 pixels"),  # no int64 overflow on start + length
    ("-9223372036854775808 1", "run 1 starts at -9223372036854775808"),
    ("10 5 12 3", "run 2 (12 3) overlaps run 1 (10 5)"),
    ("10 5 10 1", "overlaps run 1"),
    ("20 2 10 2", "run 2 starts at 10, before run 1 at 20; runs must be sorted"),
    ("1 2 \u00e9", "non-ASCII character"),
    ("1 2\u00a03 4", "non-ASCII character"),
    (None, "expected text, got NoneType"),
    (float("nan"), "expected text, got float"),
]


@pytest.mark.parametrize(("text", "problem"), BAD_RLE, ids=[repr(text)[:20] for text, _ in BAD_RLE])
def test_bad_rle_raises_one_line_error_naming_where_and_problem(text, problem):
    with pytest.raises(PipelineError) as excinfo:
        rle.decode(text, where="sub.csv: id abc")
    assert_one_line_error(excinfo, problem)
    assert str(excinfo.value).startswith("sub.csv: id abc: bad RLE (")


def test_decode_many_names_the_id_of_the_bad_row():
    with pytest.raises(PipelineError) as excinfo:
        rle.decode_many(["1 1", "", "7 0"], ids=["a", "b", "c"], where="pred.csv")
    assert_one_line_error(excinfo)
    assert str(excinfo.value) == "pred.csv: id c: bad RLE (run 1 has length 0; lengths must be at least 1)"


def test_decode_many_reports_the_first_bad_row_whatever_its_kind():
    # Row 1 has a bad number, row 2 bad text: the error is about row 1.
    with pytest.raises(PipelineError) as excinfo:
        rle.decode_many(["1 1", "0 1", "x y"], ids=["a", "b", "c"], where="pred.csv")
    assert str(excinfo.value).startswith("pred.csv: id b: bad RLE (run 1 starts at 0")


def test_decode_many_without_ids_names_the_row_index():
    with pytest.raises(PipelineError, match=r"^masks: mask 1: bad RLE \(odd"):
        rle.decode_many(["", "3"], where="masks")


def test_error_location_with_a_newline_stays_one_line():
    with pytest.raises(PipelineError) as excinfo:
        rle.decode("1", where="weird\nname.csv")
    assert_one_line_error(excinfo, "weird\\nname.csv")


# ---------------------------------------------------------------- properties


@st.composite
def masks_2d(draw):
    height = draw(st.integers(1, 12))
    width = draw(st.integers(1, 12))
    bits = draw(st.lists(st.booleans(), min_size=height * width, max_size=height * width))
    return np.array(bits, dtype=bool).reshape(height, width)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(masks_2d())
def test_decode_inverts_encode_for_any_mask(mask):
    text = rle.encode(mask)
    assert np.array_equal(rle.decode(text, shape=mask.shape), mask)
    assert rle.encode_many(mask[None]) == [text]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40), st.text(alphabet="0123456789 -\t+.", max_size=40)))
def test_decoding_any_string_either_works_or_raises_a_one_line_pipeline_error(text):
    try:
        mask = rle.decode(text, shape=(7, 5), where="x.csv")
    except PipelineError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("x.csv: bad RLE (")
    else:
        assert mask.shape == (7, 5) and mask.dtype == bool
        assert rle.encode(mask) == "" or np.array_equal(rle.decode(rle.encode(mask), shape=(7, 5)), mask)


RLE_ALPHABET = "0123456789 -\t+.x"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(alphabet=RLE_ALPHABET, max_size=16), st.sampled_from(["", "1 3", "4 2 9 1"])),
                min_size=1, max_size=6))
def test_decode_many_fails_exactly_at_the_first_row_that_fails_alone(texts):
    def fails_alone(text):
        try:
            rle.decode(text, shape=(4, 3))
        except PipelineError:
            return True
        return False

    first_bad = next((index for index, text in enumerate(texts) if fails_alone(text)), None)
    try:
        masks = rle.decode_many(texts, shape=(4, 3), ids=[f"r{i}" for i in range(len(texts))], where="f.csv")
    except PipelineError as exc:
        assert first_bad is not None and str(exc).startswith(f"f.csv: id r{first_bad}: bad RLE (")
    else:
        assert first_bad is None
        for text, mask in zip(texts, masks):
            assert np.array_equal(mask, rle.decode(text, shape=(4, 3)))


# ---------------------------------------------------------------- CSV files


def write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "empty file"),
        (b"\n\n", "empty file"),
        (b"id,rle\na,1 1\n", "header is 'id,rle', expected 'id,rle_mask'"),
        (b"a,1 1\n", "header is 'a,1 1'"),
        (b"id,rle_mask\na,1 1\na,\n", "line 3: duplicate id 'a' (first on line 2)"),
        (b"id,rle_mask\n,1 1\n", "line 2: empty id"),
        (b"id,rle_mask\na,1 1,3\n", "line 2: expected 2 fields (id,rle_mask), got 3"),
        (b"id,rle_mask\na\n", "line 2: expected 2 fields"),
        (b"id,rle_mask\na,\xff\xfe\n", "not UTF-8 text"),
        (b'id,rle_mask\na,"1 1\n', "malformed CSV"),
    ],
)
def test_read_rle_csv_rejects_bad_files_with_one_line_naming_the_file(tmp_path, content, problem):
    path = write(tmp_path / "sub.csv", content)
    with pytest.raises(PipelineError) as excinfo:
        rle.read_rle_csv(path)
    assert_one_line_error(excinfo, str(path), problem)


def test_read_rle_csv_missing_file_and_folder(tmp_path):
    with pytest.raises(PipelineError, match="nope.csv: file not found"):
        rle.read_rle_csv(tmp_path / "nope.csv")
    with pytest.raises(PipelineError, match="is a folder"):
        rle.read_rle_csv(tmp_path)


def test_read_rle_csv_accepts_windows_line_ends_and_a_byte_order_mark(tmp_path):
    path = write(tmp_path / "sub.csv", "\ufeffid,rle_mask\r\na,1 2\r\nb,\r\n".encode())
    table = rle.read_rle_csv(path)
    assert table["id"].tolist() == ["a", "b"]
    assert table["rle_mask"].tolist() == ["1 2", ""]


def test_write_rle_csv_is_kaggle_layout_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "out" / "sub.csv"
    rle.write_rle_csv(path, ["b", "a"], ["1 2", ""])
    assert path.read_bytes() == b"id,rle_mask\nb,1 2\na,\n"
    assert os.listdir(path.parent) == ["sub.csv"]
    assert rle.read_rle_csv(path)["id"].tolist() == ["b", "a"]


# ---------------------------------------------------------------- CLI (pipeline.data does the file work)


def test_cli_rle_encode_then_decode_reproduces_real_masks(tgs_sample, real_masks, tmp_path, capsys):
    table, masks = real_masks
    picked = list(range(0, len(table), 150))  # ~20 masks, empty and salty
    mask_dir = tmp_path / "masks"
    mask_dir.mkdir()
    for index in picked:
        shutil.copy(tgs_sample / "train" / "masks" / f"{table['id'][index]}.png", mask_dir)

    out_csv = tmp_path / "encoded.csv"
    assert main(["rle", "encode", "--masks", str(mask_dir), "--out", str(out_csv)]) == 0
    assert f"encoded {len(picked)} masks" in capsys.readouterr().out
    encoded = rle.read_rle_csv(out_csv).set_index("id")["rle_mask"].to_dict()
    assert encoded == {table["id"][i]: table["rle_mask"][i] for i in picked}

    out_dir = tmp_path / "decoded"
    assert main(["rle", "decode", "--csv", str(out_csv), "--out", str(out_dir)]) == 0
    assert f"decoded {len(picked)} masks" in capsys.readouterr().out
    for index in picked:
        assert np.array_equal(read_png_mask(out_dir / f"{table['id'][index]}.png"), masks[index])


def test_cli_rle_decode_bad_row_exits_2_with_one_line(tmp_path, capsys):
    bad_csv = write(tmp_path / "bad.csv", b"id,rle_mask\nabc,1 2 3\n")
    assert main(["rle", "decode", "--csv", str(bad_csv), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "bad.csv: id abc: bad RLE (odd number of values (3)" in err


def test_decode_many_takes_ids_by_position_even_from_a_pandas_series():
    import pandas as pd

    ids = pd.Series(["first", "second"], index=[7, 3])
    with pytest.raises(PipelineError, match=r"^sub.csv: id second: bad RLE"):
        rle.decode_many(["1 1", "1"], ids=ids, where="sub.csv")
