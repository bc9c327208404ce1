"""Kaggle run-length encoding of binary masks, and the `id,rle_mask` CSV files that hold it.

The TGS format: pixels are numbered 1..H*W in column-major order (down the first
column, then the next), and a mask is written as "start length" pairs separated
by spaces; an empty mask is the empty string. `encode(read(train/masks/X.png))`
reproduces Kaggle's train.csv byte for byte (tests/test_rle.py checks every row).

Both directions are vectorised with numpy over whole batches of masks: run
boundaries come from one comparison of neighbouring pixels over the column-major
flattened masks, and decoding fills every run of a batch with one cumulative sum. `decode` is strict —
a submission with a malformed row should fail here, naming the row, rather than
score silently wrong on Kaggle — and every problem is a one-line PipelineError
"<where>: bad RLE (<problem>)". Runs may touch (start == previous end + 1) since
that decodes unambiguously, but never overlap or go backwards.
"""

from __future__ import annotations

import csv
import io
import os
import re
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from pipeline.errors import PipelineError
from pipeline.fileio import atomic_open, read_bounded_text

if TYPE_CHECKING:  # pandas is imported lazily so `python -m pipeline rle ...` starts fast
    import pandas as pd

MASK_SHAPE = (101, 101)
CSV_HEADER = ["id", "rle_mask"]

# Masks are processed this many at a time so the int8 work arrays stay small
# (18000 test masks at once would need ~0.5 GB of temporaries).
_CHUNK = 1024
# Bounds on what an id,rle_mask CSV of 101x101 masks can plausibly be, checked before it is held in
# memory: TGS has 18000 test and 4000 train images, and its train.csv averages ~240 bytes a row
# (the worst possible row, alternate pixels, is ~41 KB). A multi-million-row file would otherwise
# decode to 10 KB of masks per row (46 GB for 4.5 million) before anything looked at it.
MAX_CSV_ROWS = 100_000
MAX_CSV_BYTES = 128 << 20
_INTEGER = re.compile(r"-?[0-9]+", re.ASCII)


# ---------------------------------------------------------------- encode


def encode(mask: np.ndarray) -> str:
    """The RLE string of one 2-D mask (bool, or integers where non-zero is salt)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode expects a 2-D mask, got shape {mask.shape}")
    return encode_many(mask[None])[0]


def encode_many(masks: np.ndarray) -> list[str]:
    """RLE strings of a stack of masks [N, H, W], in order."""
    masks = as_mask_stack(masks)
    rles: list[str] = []
    for first in range(0, len(masks), _CHUNK):
        rles.extend(_encode_chunk(masks[first:first + _CHUNK]))
    return rles


def _encode_chunk(masks: np.ndarray) -> list[str]:
    count, height, width = masks.shape
    n_pixels = height * width
    row_length = n_pixels + 2
    # Column-major pixel order = row-major order of the transposed image. A False on
    # each side of every image makes every run open and close inside its own row, so
    # the whole chunk can be scanned as one flat array.
    padded = np.zeros((count, row_length), dtype=bool)
    padded[:, 1:-1] = masks.transpose(0, 2, 1).reshape(count, n_pixels)
    flat = padded.ravel()
    # (flatnonzero on a bool array is ~15x faster than nonzero on a 2-D int8 diff.)
    change_at = np.flatnonzero(flat[1:] != flat[:-1])
    image_of_change, pixel_at = np.divmod(change_at, row_length)
    # Within an image changes alternate: the 0-based first pixel of a run, then the
    # 0-based pixel just past it; flatnonzero lists them image by image, in order.
    run_starts = pixel_at[0::2]
    values = np.empty(pixel_at.size, dtype=np.int64)
    values[0::2] = run_starts + 1  # 1-indexed
    values[1::2] = pixel_at[1::2] - run_starts
    values_per_image = 2 * np.bincount(image_of_change[0::2], minlength=count)
    bounds = np.concatenate([[0], np.cumsum(values_per_image)]).tolist()
    tokens = list(map(str, values.tolist()))
    return [" ".join(tokens[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


def as_mask_stack(masks: np.ndarray, name: str = "masks") -> np.ndarray:
    """Masks [N,H,W] as bool (integer: non-zero is salt); floats are refused, not guessed at."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"{name} must be masks [N, H, W], got shape {masks.shape}")
    if masks.dtype == np.bool_:
        return masks
    if not np.issubdtype(masks.dtype, np.integer):
        # A float array here is almost always unthresholded probabilities.
        raise TypeError(f"{name} must be bool or integer masks (non-zero = salt), got {masks.dtype}; "
                        "threshold probabilities first")
    return masks != 0


# ---------------------------------------------------------------- decode


def decode(rle: str, shape: tuple[int, int] = MASK_SHAPE, where: str = "") -> np.ndarray:
    """The bool mask [H, W] of one RLE string; PipelineError "<where>: bad RLE (...)" if malformed."""
    return _decode_rows([rle], shape, lambda _: where)[0]


def decode_many(
    rles: Sequence[str],
    shape: tuple[int, int] = MASK_SHAPE,
    ids: Sequence[str] | None = None,
    where: str = "",
) -> np.ndarray:
    """Bool masks [N, H, W] of N RLE strings.

    An error names `where` (usually the CSV file) and the row's id when `ids` is
    given, else its 0-based index: "sub.csv: id 3f2a...: bad RLE (odd number of values (3): ...)".
    """
    rles = list(rles)
    ids = list(ids) if ids is not None else None  # positions, even for a pandas Series
    if ids is not None and len(ids) != len(rles):
        raise ValueError(f"decode_many got {len(rles)} RLE strings but {len(ids)} ids")

    def locate(index: int) -> str:
        row = f"id {ids[index]}" if ids is not None else f"mask {index}"
        return f"{where}: {row}" if where else row

    return _decode_rows(rles, shape, locate)


def decode_chunks(
    rles: Sequence[str],
    shape: tuple[int, int] = MASK_SHAPE,
    ids: Sequence[str] | None = None,
    where: str = "",
) -> Iterator[tuple[int, np.ndarray]]:
    """(index of the first row, its bool masks [n, H, W]) for consecutive chunks of rows: what
    `decode_many` returns, without holding every mask at once (scoring a CSV)."""
    height, width = _check_shape(shape)
    rles = list(rles)
    ids = list(ids) if ids is not None else None
    for first in range(0, len(rles), _CHUNK):
        yield first, _decode_chunk(rles[first:first + _CHUNK], height, width, _locator(ids, where, first))


def _locator(ids: list[str] | None, where: str, first: int) -> Callable[[int], str]:
    """How an error names row `first + index`: by id when there are ids, else by position."""
    def locate(index: int) -> str:
        row = f"id {ids[first + index]}" if ids is not None else f"mask {first + index}"
        return f"{where}: {row}" if where else row

    return locate


def _decode_rows(rles: list, shape: tuple[int, int], locate: Callable[[int], str]) -> np.ndarray:
    height, width = _check_shape(shape)
    masks = np.empty((len(rles), height, width), dtype=bool)
    for first in range(0, len(rles), _CHUNK):
        chunk = rles[first:first + _CHUNK]
        masks[first:first + len(chunk)] = _decode_chunk(chunk, height, width, lambda i: locate(first + i))
    return masks


def check_many(
    rles: Sequence[str],
    shape: tuple[int, int] = MASK_SHAPE,
    ids: Sequence[str] | None = None,
    where: str = "",
) -> None:
    """The checks of `decode_many` (same PipelineError for the first bad row) without painting
    or keeping any mask: validating a submission costs no mask memory at all."""
    height, width = _check_shape(shape)
    rles = list(rles)
    ids = list(ids) if ids is not None else None
    for first in range(0, len(rles), _CHUNK):
        _chunk_runs(rles[first:first + _CHUNK], height, width, _locator(ids, where, first))


def _decode_chunk(rles: list, height: int, width: int, locate: Callable[[int], str]) -> np.ndarray:
    n_pixels = height * width
    starts0, ends = _chunk_runs(rles, height, width, locate)

    # The chunk's pixels, flattened image after image in column-major order, are
    # alternating gaps and runs: one np.repeat paints them all.
    edges = np.empty(2 * starts0.size + 2, dtype=np.int64)
    edges[0], edges[-1] = 0, len(rles) * n_pixels
    edges[1:-1:2], edges[2:-1:2] = starts0, ends
    is_run = np.zeros(edges.size - 1, dtype=bool)
    is_run[1::2] = True
    inside_run = np.repeat(is_run, np.diff(edges))
    return inside_run.reshape(len(rles), width, height).transpose(0, 2, 1)


def _chunk_runs(rles: list, height: int, width: int, locate: Callable[[int], str]) -> tuple[np.ndarray, np.ndarray]:
    """The checked runs of a chunk of rows (see _checked_runs), or the first row's problem."""
    parsed = _parse_texts(rles)
    if parsed is None:
        # Slow path, only for a malformed chunk: explain the first row whose text is
        # bad, unless an earlier (well-formed) row already has a bad run.
        first_bad, problem = next(
            ((index, problem) for index, problem in enumerate(map(_text_problem, rles)) if problem), (None, ""))
        earlier = _parse_texts(rles[:first_bad]) if first_bad is not None else None
        if earlier is None:  # _parse_texts and _text_problem must agree on what is malformed
            raise AssertionError(f"RLE fast and slow checks disagree (first bad row {first_bad})")
        _checked_runs(*earlier, height, width, locate)
        raise _bad_rle(locate(first_bad), problem)
    return _checked_runs(*parsed, height, width, locate)


def _parse_texts(rles: list) -> tuple[np.ndarray, np.ndarray] | None:
    """(every integer of the chunk, how many each row holds), or None if any row is malformed.

    Whole-chunk string checks and one numpy conversion instead of per-row checks;
    `_text_problem` goes row by row only once something is known to be wrong.
    """
    if not all(isinstance(rle, str) for rle in rles) or not "".join(rles).isascii():
        return None
    token_lists = [rle.split() for rle in rles]
    values_per_row = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
    if (values_per_row % 2).any():
        return None
    tokens = list(chain.from_iterable(token_lists))
    if not "".join(tokens).replace("-", "").isdigit() and tokens:
        return None  # signs other than a leading "-", dots, letters...
    try:
        # Accepts "-5" (reported later as a bad start or length); rejects "1-2" and
        # anything outside int64.
        values = np.array(tokens, dtype=np.int64) if tokens else np.zeros(0, dtype=np.int64)
    except (ValueError, OverflowError):
        return None
    return values, values_per_row


def _text_problem(rle: object) -> str:
    """What makes `rle` unreadable as whitespace-separated integer pairs ("" if nothing)."""
    if not isinstance(rle, str):
        return f"expected text, got {type(rle).__name__}"
    if not rle.isascii():
        bad = next(char for char in rle if not char.isascii())
        return f"non-ASCII character {bad!r}"
    tokens = rle.split()
    bad = next((token for token in tokens if not _INTEGER.fullmatch(token)), None)
    if bad is not None:
        return f"{_show(bad)} is not an integer"
    huge = next((token for token in tokens if not _fits_int64(token)), None)
    if huge is not None:
        return f"value {_show(huge)} is too large"
    if len(tokens) % 2:
        return f"odd number of values ({len(tokens)}): expected start length pairs"
    return ""


def _fits_int64(token: str) -> bool:
    return len(token) <= 20 and -(2**63) <= int(token) < 2**63


def _checked_runs(
    values: np.ndarray, values_per_row: np.ndarray, height: int, width: int, locate: Callable[[int], str]
) -> tuple[np.ndarray, np.ndarray]:
    """0-based run starts and exclusive ends, offset by image into one flat pixel index.

    All checks are vectorised over every run of the chunk; only the first bad run
    (in row order) is then explained.
    """
    n_pixels = height * width
    starts, lengths = values[0::2], values[1::2]
    image_of_run = np.repeat(np.arange(values_per_row.size), values_per_row // 2)
    # Flagging starts or lengths beyond the mask first keeps `ends` below int64 overflow
    # for every run that is not already flagged.
    bad = (starts < 1) | (lengths < 1) | (starts > n_pixels) | (lengths > n_pixels)
    starts0 = starts - 1
    ends = starts0 + lengths
    bad |= ends > n_pixels
    same_image = image_of_run[1:] == image_of_run[:-1]
    bad[1:] |= same_image & (starts0[1:] < ends[:-1])
    if bad.any():
        run = int(np.argmax(bad))
        image = int(image_of_run[run])
        first_run_of_image = int(np.searchsorted(image_of_run, image))
        problem = _run_problem(starts, lengths, run, run - first_run_of_image, n_pixels, height, width)
        raise _bad_rle(locate(image), problem)

    offsets = image_of_run * n_pixels
    return starts0 + offsets, ends + offsets


def _run_problem(
    starts: np.ndarray, lengths: np.ndarray, run: int, run_in_image: int, n_pixels: int, height: int, width: int
) -> str:
    start, length = int(starts[run]), int(lengths[run])
    name = f"run {run_in_image + 1}"
    if start < 1:
        return f"{name} starts at {start}; pixels are numbered from 1"
    if length < 1:
        return f"{name} has length {length}; lengths must be at least 1"
    last = start + length - 1
    if last > n_pixels:
        return f"{name} ({start} {length}) ends at pixel {last}, past the {n_pixels} pixels of a {height}x{width} mask"
    previous_start, previous_length = int(starts[run - 1]), int(lengths[run - 1])
    if start < previous_start:
        return f"{name} starts at {start}, before run {run_in_image} at {previous_start}; runs must be sorted"
    return f"{name} ({start} {length}) overlaps run {run_in_image} ({previous_start} {previous_length})"


def _bad_rle(location: str, problem: str) -> PipelineError:
    location = location.replace("\r", "\\r").replace("\n", "\\n")
    return PipelineError(f"{location}: bad RLE ({problem})" if location else f"bad RLE ({problem})")


def _show(token: str, limit: int = 24) -> str:
    return repr(token if len(token) <= limit else token[:limit] + "...")


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2 or any(int(side) != side or side < 1 for side in shape):
        raise ValueError(f"shape must be two positive integers, got {shape!r}")
    return int(shape[0]), int(shape[1])


# ---------------------------------------------------------------- CSV files


def read_rle_csv(path: str | os.PathLike) -> "pd.DataFrame":
    """An `id,rle_mask` CSV as a DataFrame of two str columns, in file order.

    Empty masks stay "" (never NaN). PipelineError, naming the file and line, when
    the file is missing, not UTF-8, empty, has another header, a row without
    exactly two fields, an empty id or a repeated id. RLE strings are not decoded
    here: `decode_many(..., ids=..., where=path)` checks them.
    """
    import pandas as pd

    path = Path(path)
    text = _read_text(path)
    if not text.strip():
        raise PipelineError(f"{path}: empty file (expected the header {','.join(CSV_HEADER)})")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    ids: list[str] = []
    rles: list[str] = []
    line_of_id: dict[str, int] = {}
    try:
        header = next(reader)
        if header != CSV_HEADER:
            shown = _show(",".join(header), 60)
            raise PipelineError(f"{path}: header is {shown}, expected {','.join(CSV_HEADER)!r}")
        for row in reader:
            line = reader.line_num
            if not row:  # blank line
                continue
            if len(row) != 2:
                raise PipelineError(f"{path}: line {line}: expected 2 fields (id,rle_mask), got {len(row)}")
            image_id, rle = row
            if not image_id:
                raise PipelineError(f"{path}: line {line}: empty id")
            if any(char.isspace() for char in image_id):  # ids are written and read split on whitespace
                raise PipelineError(f"{path}: line {line}: id {_show(image_id)} holds whitespace")
            if image_id in line_of_id:
                raise PipelineError(
                    f"{path}: line {line}: duplicate id {_show(image_id)} (first on line {line_of_id[image_id]})")
            line_of_id[image_id] = line
            ids.append(image_id)
            rles.append(rle)
            if len(ids) > MAX_CSV_ROWS:
                raise PipelineError(f"{path}: more than {MAX_CSV_ROWS} rows, far more than a TGS id,rle_mask "
                                    "CSV holds (18000 test, 4000 train images); is it the right file?")
    except csv.Error as exc:
        raise PipelineError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from None
    return pd.DataFrame({"id": pd.Series(ids, dtype=str), "rle_mask": pd.Series(rles, dtype=str)})


def _read_text(path: Path) -> str:
    # utf-8-sig: a spreadsheet's byte-order mark is not part of the header
    return read_bounded_text(path, MAX_CSV_BYTES, kind="an id,rle_mask CSV file", too_large=lambda size: _too_large(path, size),
                             encoding="utf-8-sig")


def _too_large(path: Path, size: str) -> str:
    return (f"{path}: {size}, over the {MAX_CSV_BYTES >> 20} MiB an id,rle_mask CSV of 101x101 masks can "
            "plausibly be (TGS's 4000-row train.csv is 0.7 MiB); is it the right file?")


def write_rle_csv(path: str | os.PathLike, ids: Sequence[str], rles: Sequence[str]) -> None:
    """Atomically write `id,rle_mask` rows with Kaggle's layout ("\\n" line ends, empty mask = "id,")."""
    ids, rles = list(ids), list(rles)
    if len(ids) != len(rles):
        raise ValueError(f"write_rle_csv got {len(ids)} ids but {len(rles)} RLE strings")
    with atomic_open(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        writer.writerows(zip(ids, rles))
