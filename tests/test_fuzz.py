"""Fuzzed bad input: every reader either accepts a file with the right result or refuses it
with a one-line PipelineError naming the file — never another exception, never a wrong mask.

Covers rle.decode / read_rle_csv / metric.score_csvs, data.read_image / read_mask (random
bytes, truncated and bit-flipped PNGs, other modes and sizes), depths.csv and folds files,
and any value of any numeric config key (kept inside its range or refused naming the key).
Each property is checked against an independent reference (a naive run painter, Pillow's
own decoding of the intact file, Python's float/int), so "accepted" also means "correct".
150 examples per property (40 for score_csvs) keep the file near 10 s.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline import config, data, rle
from pipeline.errors import PipelineError
from pipeline.folds import load_folds
from pipeline.metric import competition_score, score_csvs

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder for the whole module: hypothesis runs many examples per test function."""
    return tmp_path_factory.mktemp("fuzz")


def assert_one_line_refusal(exc: BaseException, path: Path | str) -> None:
    """A PipelineError whose message is one printable line naming the file."""
    assert isinstance(exc, PipelineError), f"{type(exc).__name__} escaped: {exc!r}"
    message = str(exc)
    assert len(message.splitlines()) == 1 and "\r" not in message, repr(message)
    assert str(path) in message, f"{path} not named in {message!r}"


def call(reader, *args):
    """(result, None) or (None, exception): only PipelineError may come back as an exception."""
    try:
        return reader(*args), None
    except Exception as exc:  # anything else fails in assert_one_line_refusal with its type
        return None, exc


# ---------------------------------------------------------------- RLE strings

ASCII_SPACES = [" ", "  ", "\t", " \t "]
numbers = st.one_of(
    st.integers(-3, 60),  # around a 7x8 mask: zero, negative, in range, past the end
    st.integers(-(2**70), 2**70),  # beyond int64 both ways
    st.sampled_from([0, 1, 56, 57, 2**63 - 1, 2**63, -(2**63)]),
)


def paint_runs(tokens: list[str], n_pixels: int) -> np.ndarray | None:
    """A naive reference decoder: the column-major flat mask, or None when the pairs are not
    sorted, non-overlapping, 1-indexed runs inside the mask."""
    if len(tokens) % 2 or not all(re.fullmatch(r"-?[0-9]+", t) for t in tokens):
        return None
    values = [int(t) for t in tokens]
    flat = np.zeros(n_pixels, dtype=bool)
    previous_end = 0
    for start, length in zip(values[0::2], values[1::2]):
        if start < 1 or length < 1 or start - 1 < previous_end or start - 1 + length > n_pixels:
            return None
        flat[start - 1:start - 1 + length] = True
        previous_end = start - 1 + length
    return flat


@FUZZ
@given(st.lists(numbers, max_size=12), st.lists(st.sampled_from(ASCII_SPACES), min_size=13, max_size=13),
       st.sampled_from(["", " ", "\n"]))
def test_rle_string_is_decoded_exactly_as_runs_or_refused(values, spaces, edge):
    shape = (7, 8)
    text = edge + "".join(f"{v}{s}" for v, s in zip(values, spaces)) + edge
    expected = paint_runs(text.split(), shape[0] * shape[1])
    mask, error = call(rle.decode, text, shape, "sub.csv")
    if expected is None:
        assert error is not None, f"{text!r} accepted as {rle.encode(mask)!r}"
        assert_one_line_refusal(error, "sub.csv")
        return
    assert error is None, f"{text!r} refused: {error}"
    assert np.array_equal(mask.T.ravel(), expected)  # column-major, as Kaggle numbers pixels
    canonical = rle.encode(mask)  # touching runs merge; the mask is the same
    assert np.array_equal(rle.decode(canonical, shape), mask)
    assert sum(map(int, canonical.split()[1::2])) == int(expected.sum())


@FUZZ
@given(st.text(max_size=30))
def test_any_unicode_rle_text_is_refused_or_decodes_to_its_runs(text):
    mask, error = call(rle.decode, text, (7, 8), "x.csv")
    if error is not None:
        assert_one_line_refusal(error, "x.csv")
    else:
        # accepted text must be ASCII integers in whitespace; Python's split() also splits on
        # the ASCII separators \x1c-\x1f, which decode treats as spaces
        expected = paint_runs(text.split(), 56)
        assert expected is not None and np.array_equal(mask.T.ravel(), expected)


# ---------------------------------------------------------------- RLE CSV files

ids = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=0, max_size=8)
rle_cells = st.one_of(st.sampled_from(["", "1 5", "3 2 9 1", "1 10201"]), st.text("0123456789 -x", max_size=8))


@FUZZ
@given(st.lists(st.tuples(ids, rle_cells), max_size=6), st.sampled_from(["\n", "\r\n"]), st.booleans(),
       st.sampled_from(["id,rle_mask", "id,rle_mask,extra", "rle_mask,id", "", "ID,rle_mask"]))
def test_rle_csv_rows_come_back_exactly_or_the_file_is_refused(scratch, rows, newline, bom, header):
    path = scratch / "rows.csv"
    buffer = io.StringIO()
    # Python 3.11's writer leaves a lone "\r" unquoted (then it is a line break): quote all then
    quoting = csv.QUOTE_ALL if any("\r" in i + r for i, r in rows) else csv.QUOTE_MINIMAL
    writer = csv.writer(buffer, lineterminator=newline, quoting=quoting)
    if header:
        buffer.write(header + newline)
    writer.writerows(rows)
    path.write_bytes(("\ufeff" if bom else "").encode() + buffer.getvalue().encode("utf-8"))
    table, error = call(rle.read_rle_csv, path)
    row_ids = [i for i, _ in rows]
    valid = header == "id,rle_mask" and all(row_ids) and len(set(row_ids)) == len(row_ids) \
        and not any(char.isspace() for i in row_ids for char in i)  # ids are split on whitespace
    if error is not None:
        assert_one_line_refusal(error, path)
        assert not valid, f"valid file refused: {error}"
        return
    assert valid, f"{buffer.getvalue()!r} accepted"
    assert table["id"].tolist() == row_ids and table["rle_mask"].tolist() == [r for _, r in rows]


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_as_rle_csv_are_refused_or_read_as_unique_rows(scratch, raw):
    path = scratch / "random.csv"
    path.write_bytes(raw)
    table, error = call(rle.read_rle_csv, path)
    if error is not None:
        assert_one_line_refusal(error, path)
    else:
        assert list(table.columns) == ["id", "rle_mask"] and table["id"].is_unique and (table["id"] != "").all()


@FEW
@given(st.integers(1, 5), st.integers(0, 2**32 - 1),
       st.sampled_from(["ok", "bad-rle", "missing-row", "extra-row", "random-bytes", "non-utf8", "empty", "crlf"]))
def test_score_csvs_equals_the_metric_on_the_masks_or_names_the_bad_file(scratch, count, seed, damage):
    rng = np.random.default_rng(seed)
    truth = rng.random((count, 101, 101)) < rng.random((count, 1, 1)) * 0.02  # some empty, some salt
    pred = np.roll(truth, 1, axis=2) | (rng.random((count, 101, 101)) < 0.001)
    image_ids = [f"img{i}" for i in range(count)]
    truth_csv, pred_csv = scratch / "truth.csv", scratch / "pred.csv"
    rle.write_rle_csv(truth_csv, image_ids, rle.encode_many(truth))
    rle.write_rle_csv(pred_csv, image_ids, rle.encode_many(pred))
    text = pred_csv.read_text()
    if damage == "bad-rle":
        pred_csv.write_text(text.replace("img0,", "img0,5 0 ", 1))
    elif damage == "missing-row":
        pred_csv.write_text("".join(text.splitlines(keepends=True)[:-1]))
    elif damage == "extra-row":
        pred_csv.write_text(text + "stranger,1 1\n")
    elif damage == "random-bytes":
        pred_csv.write_bytes(rng.bytes(64))
    elif damage == "non-utf8":
        pred_csv.write_bytes(text.encode() + b"\xff\xfe,1 1\n")
    elif damage == "empty":
        pred_csv.write_bytes(b"")
    elif damage == "crlf":
        pred_csv.write_bytes(text.replace("\n", "\r\n").encode())
    result, error = call(score_csvs, truth_csv, pred_csv)
    if damage in ("ok", "crlf"):
        assert error is None, error
        assert result == (pytest.approx(competition_score(truth, pred)), count)
    else:
        assert error is not None, f"{damage} scored {result}"
        assert_one_line_refusal(error, pred_csv)


# ---------------------------------------------------------------- PNG files


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def synthesised_png(mode: str, size: tuple[int, int], rng: np.random.Generator):
    """(PNG bytes, expected read_image, expected read_mask) for a PNG of `mode` and `size`."""
    width, height = size
    gray = rng.integers(0, 256, (height, width), dtype=np.uint8)
    gray[rng.random((height, width)) < 0.4] = 0  # zeros: background in masks
    if mode == "1":
        bits = gray > 127
        return _png(Image.fromarray(bits)), bits.astype(np.uint8) * 255, bits
    if mode == "L":
        return _png(Image.fromarray(gray)), gray, gray != 0
    if mode == "LA":
        alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
        image = Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)])
        return _png(image), gray, gray != 0
    if mode in ("RGB", "RGBA"):
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        rgb[rng.random((height, width)) < 0.4] = 0
        planes = np.dstack([rgb, gray]) if mode == "RGBA" else rgb
        return _png(Image.fromarray(planes)), rgb[..., 0], rgb.any(axis=2)
    if mode == "P":
        palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        palette[0] = 0
        index = rng.integers(0, 8, (height, width), dtype=np.uint8)
        image = Image.fromarray(index, "P")
        image.putpalette(palette.ravel().tolist())
        colours = palette[index]
        return _png(image), colours[..., 0], colours.any(axis=2)
    if mode == "I;16":
        wide = rng.integers(0, 65536, (height, width), dtype=np.uint16)
        wide[rng.random((height, width)) < 0.4] = 0
        expected = ((wide.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
        return _png(Image.fromarray(wide)), expected, wide != 0
    raise AssertionError(mode)


MODES = ["1", "L", "LA", "RGB", "RGBA", "P", "I;16"]


@FUZZ
@given(st.sampled_from(MODES), st.sampled_from([(101, 101), (101, 101), (100, 101), (101, 100), (1, 1), (202, 202)]),
       st.integers(0, 2**32 - 1))
def test_png_of_any_mode_reads_as_its_pixels_or_wrong_size_is_refused(scratch, mode, size, seed):
    raw, image, mask = synthesised_png(mode, size, np.random.default_rng(seed))
    path = scratch / "any_mode.png"
    path.write_bytes(raw)
    for reader, expected in ((data.read_image, image), (data.read_mask, mask)):
        got, error = call(reader, path)
        if size != (101, 101):
            assert error is not None
            assert_one_line_refusal(error, path)
            assert f"image is {size[0]}x{size[1]}, expected 101x101" in str(error)
        else:
            assert error is None, error
            assert got.shape == (101, 101) and np.array_equal(got, expected), f"{mode} {reader.__name__}"


def _damaged_reads_are_refused_or_exact(path: Path, original: bytes, damaged: bytes) -> None:
    """The damaged file reads as the intact one or is refused; never as other pixels."""
    path.write_bytes(original)
    intact = data.read_image(path), data.read_mask(path)
    path.write_bytes(damaged)
    for reader, expected in zip((data.read_image, data.read_mask), intact):
        got, error = call(reader, path)
        if error is not None:
            assert_one_line_refusal(error, path)
        else:
            assert np.array_equal(got, expected), f"{reader.__name__} read a damaged file as other pixels"


damage = st.tuples(st.sampled_from(["cut", "flip"]), st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 7))


def _damage(raw: bytes, how: tuple[str, float, int]) -> bytes:
    kind, where, bit = how
    position = int(where * len(raw))
    if kind == "cut":
        return raw[:position]
    flipped = bytearray(raw)
    flipped[position] ^= 1 << bit
    return bytes(flipped)


@FUZZ
@given(st.sampled_from(["L", "RGB", "I;16", "P"]), st.integers(0, 2**32 - 1), damage)
def test_truncated_or_bit_flipped_synthesised_png_is_refused_or_read_exactly(scratch, mode, seed, how):
    raw, _, _ = synthesised_png(mode, (101, 101), np.random.default_rng(seed))
    _damaged_reads_are_refused_or_exact(scratch / "damaged.png", raw, _damage(raw, how))


@pytest.fixture(scope="module")
def real_pngs(tgs_sample) -> list[Path]:
    """A few real images and masks: 8-bit empty masks, 16-bit salt masks, RGB images."""
    masks = sorted((tgs_sample / "train" / "masks").glob("*.png"))[:40]
    salt = [p for p in masks if data.read_mask(p).any()][:4]
    empty = [p for p in masks if not data.read_mask(p).any()][:2]
    images = sorted((tgs_sample / "train" / "images").glob("*.png"))[:4]
    return salt + empty + images  # paths, not bytes: hypothesis prints the arguments of a failure


@FUZZ
@given(st.integers(0, 9), damage)
def test_truncated_or_bit_flipped_real_png_is_refused_or_read_exactly(scratch, real_pngs, which, how):
    raw = real_pngs[which % len(real_pngs)].read_bytes()
    _damaged_reads_are_refused_or_exact(scratch / "real_damaged.png", raw, _damage(raw, how))


def _every_byte_flipped_in_pixel_data(raw: bytes):
    """`raw` with one bit flipped, for every bit of its first IDAT chunk's data."""
    start = raw.index(b"IDAT") + 4
    length = int.from_bytes(raw[start - 8:start - 4], "big")
    for position in range(start, start + length):
        for bit in range(8):
            flipped = bytearray(raw)
            flipped[position] ^= 1 << bit
            yield bytes(flipped)


def test_no_single_bit_flip_in_a_real_salt_mask_reads_as_other_pixels(scratch, real_pngs):
    # Before the CRC check about a third of these decoded silently to a different mask.
    raw = real_pngs[0].read_bytes()  # a 16-bit mask with salt
    for damaged in _every_byte_flipped_in_pixel_data(raw):
        _damaged_reads_are_refused_or_exact(scratch / "flipped_real.png", raw, damaged)


def test_no_single_bit_flip_in_a_16_bit_mask_reads_as_other_pixels(scratch):
    mask = np.zeros((101, 101), dtype=bool)
    mask[30:70, 20:90] = True
    raw = data.mask_png_bytes(mask, sixteen_bit=True)
    for damaged in _every_byte_flipped_in_pixel_data(raw):
        _damaged_reads_are_refused_or_exact(scratch / "flipped_synth.png", raw, damaged)


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda b: PNG_SIGNATURE + b)))
def test_random_bytes_as_png_are_refused_naming_the_file(scratch, raw):
    path = scratch / "random.png"
    path.write_bytes(raw)
    for reader in (data.read_image, data.read_mask):
        _, error = call(reader, path)
        assert error is not None  # 300 random bytes are never a valid 101x101 PNG
        assert_one_line_refusal(error, path)


# ---------------------------------------------------------------- depths.csv

depth_texts = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(2**80), 2**80).map(str),
    st.sampled_from(["", " ", "nan", "NaN", "inf", "-inf", "1e400", "abc", "1,5", "0x10", " 7.5 ", "1_000"]),
)
depth_ids = st.one_of(st.sampled_from(["a", "b", " a", ""]),  # repeats, padding, empty
                      st.text(st.characters(codec="utf-8", exclude_characters="\x00,\""), max_size=6))


def _expected_depths(rows: list[tuple[str, str]]) -> dict[str, float] | None:
    """id -> z when every row has a non-empty unique id and a finite number, else None."""
    found: dict[str, float] = {}
    for image_id, z in rows:
        image_id = image_id.strip()
        try:
            value = float(z.strip())
        except ValueError:
            return None
        if not image_id or image_id in found or not np.isfinite(value):
            return None
        found[image_id] = value
    return found


@FUZZ
@given(st.lists(st.tuples(depth_ids, depth_texts), max_size=5), st.sampled_from(["\n", "\r\n"]),
       st.sampled_from(["id,z", "id,z,extra", "z,id", ""]), st.booleans())
# found before the fixes: a row with a third field was read shifted ({"0.0": 9.0}); a quoted
# id with a newline broke the error message over two lines
@example(rows=[("", "0.0")], newline="\n", header="id,z", extra_field=True)
@example(rows=[("a\nb", "deep")], newline="\n", header="id,z", extra_field=False)
def test_depths_are_read_as_written_or_refused(scratch, rows, newline, header, extra_field):
    path = scratch / "depths.csv"
    buffer = io.StringIO()
    quoting = csv.QUOTE_ALL if any("\r" in i for i, _ in rows) else csv.QUOTE_MINIMAL  # as for RLE CSVs
    writer = csv.writer(buffer, lineterminator=newline, quoting=quoting)
    if header:
        buffer.write(header + newline)
    writer.writerows([(i, z, "9") if extra_field else (i, z) for i, z in rows])
    path.write_text(buffer.getvalue(), encoding="utf-8", newline="")
    depths, error = call(data.read_depths, path)
    if error is not None:
        assert_one_line_refusal(error, path)
        return
    # Accepted: exactly the rows written, each a finite number equal to Python's reading of it.
    assert header == "id,z" and not (extra_field and rows), f"{buffer.getvalue()!r} accepted as {depths}"
    expected = _expected_depths(rows)
    assert expected is not None, f"{rows!r} accepted as {depths}"
    assert depths == expected


@FUZZ
@given(st.binary(max_size=120))
def test_random_bytes_as_depths_are_refused_or_read_as_finite_depths(scratch, raw):
    path = scratch / "random_depths.csv"
    path.write_bytes(raw)
    depths, error = call(data.read_depths, path)
    if error is not None:
        assert_one_line_refusal(error, path)
    else:
        assert all(np.isfinite(v) for v in depths.values()) and all(k for k in depths)


# ---------------------------------------------------------------- folds files

fold_texts = st.one_of(
    st.integers(-5, 10).map(str),
    st.integers(0, 2**80).map(str),
    st.sampled_from(["", " 1 ", "1.0", "x", "+1", "0x1", "٣", "-0"]),
)
fold_ids = st.sampled_from(["a", "b", "c", "d", "", " a"])


@FUZZ
@given(st.lists(st.tuples(fold_ids, fold_texts), max_size=5),
       st.sampled_from(["id,fold", "id,fold,coverage_class", "fold,id", "id,split", "image,fold"]),
       st.booleans(), st.sampled_from([None, ["a"], ["a", "b"]]))
# found before the fixes: an extra field shifted the columns; a fold beyond int64 raised OverflowError
@example(rows=[("a", "0")], header="id,fold", extra_field=True, wanted=None)
@example(rows=[("a", "99999999999999999999")], header="id,fold", extra_field=False, wanted=None)
def test_folds_file_is_read_as_written_or_refused(scratch, rows, header, extra_field, wanted):
    path = scratch / "folds.csv"
    columns = header.split(",")
    lines = []
    for image_id, fold in rows:
        record = {"id": image_id, "fold": fold, "split": fold, "image": image_id, "coverage_class": "0"}
        lines.append([record[c] for c in columns] + (["7"] if extra_field else []))
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([columns] + lines)
    path.write_text(buffer.getvalue(), encoding="utf-8")
    table, error = call(load_folds, path, wanted)
    if error is not None:
        assert_one_line_refusal(error, path)
        return
    assert not (extra_field and rows), f"{buffer.getvalue()!r} accepted"
    assert "id" in columns and "fold" in columns
    read = dict(zip(table["id"].tolist(), table["fold"].tolist()))
    assert len(read) == len(rows) and all(read[i] == int(f) >= 0 for i, f in rows), (rows, read)
    assert wanted is None or set(wanted) <= set(read)


@FUZZ
@given(st.binary(max_size=120))
def test_random_bytes_as_folds_are_refused_or_read_as_non_negative_folds(scratch, raw):
    path = scratch / "random_folds.csv"
    path.write_bytes(raw)
    table, error = call(load_folds, path)
    if error is not None:
        assert_one_line_refusal(error, path)
    else:
        assert (table["fold"] >= 0).all() and table["id"].is_unique


# ---------------------------------------------------------------- config numbers


@FUZZ
@given(st.sampled_from(sorted(config.NUMBER_RANGES)),
       st.one_of(st.floats(), st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 1, 0.5, 101, 2**32]),
                 st.text(max_size=8)))
def test_any_value_of_a_numeric_config_key_is_kept_inside_its_range_or_refused_naming_the_key(key, value):
    name = key.removesuffix("[]")
    tree: dict = {}
    node = tree
    *sections, last = name.split(".")
    for section in sections:
        node = node.setdefault(section, {})
    node[last] = [value] if key.endswith("[]") else value
    cfg, error = call(config.from_dict, tree, "fuzz.yaml")
    if error is not None:
        assert isinstance(error, PipelineError), f"{type(error).__name__} escaped: {error!r}"
        message = str(error)
        assert "fuzz.yaml" in message and name in message, message
        return
    kept = config.flatten(cfg)[name]
    kept = kept[0] if key.endswith("[]") else kept
    assert np.isfinite(kept) and config.NUMBER_RANGES[key].holds(kept), (key, value, kept)
