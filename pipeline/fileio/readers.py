"""Bounded readers: a file is read only up to a size limit, and every way reading it can
fail (missing, unreadable, not UTF-8, not the expected format) is one line naming the path."""

from __future__ import annotations

import io
import json
import os
import stat
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable

from pipeline.errors import PipelineError


def read_at_most(handle: IO[bytes], max_bytes: int) -> bytes:
    """The rest of a binary file, or its first max_bytes + 1 bytes when it is longer (the caller
    refuses it): memory stays bounded for a huge file or an endless device, and, unlike
    handle.read(max_bytes + 1), nothing of max_bytes is allocated up front for a small one."""
    try:
        size = os.fstat(handle.fileno()).st_size
    except (OSError, AttributeError, io.UnsupportedOperation):
        size = 0
    chunks = [handle.read(min(size, max_bytes) + 1)] if size else []
    total = sum(map(len, chunks))
    while total <= max_bytes:
        chunk = handle.read(min(1 << 20, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


@contextmanager
def opening_errors(path, noun: str, kind: str, fix: str = ""):
    """Opening and reading `path` as one PipelineError a failure: missing, a folder, unreadable."""
    try:
        yield
    except FileNotFoundError:
        raise PipelineError(f"{path}: {noun} not found{fix}") from None
    except IsADirectoryError:
        raise PipelineError(f"{path}: is a folder, expected {kind}{fix}") from None
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read ({exc.strerror or exc}){fix}") from None


MAX_SMALL_FILE_BYTES = 64 << 20  # JSON records and id lists of a run: a few KB to ~1 MB


def refuse_pipe(path: str | os.PathLike) -> None:
    """A FIFO or socket would block `open` until some writer appears (forever, for `score --pred
    FIFO`): refused in one line before opening. Missing paths are left to the caller's open."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket"
        raise PipelineError(f"{path}: is {kind}, not a file; give a regular file")


def read_bounded_text(path: str | os.PathLike, max_bytes: int, *, noun: str = "file", kind: str = "a file",
                      too_large: Callable[[str], str] | None = None, encoding: str = "utf-8") -> str:
    """A text file of at most max_bytes, every failure one PipelineError naming it: the one
    reader behind configs, run records and RLE CSVs. noun / kind name the file in the messages
    ("config file not found", "is a folder, expected a YAML config file"); too_large(size) words
    the refusal of a longer file, size being "130 MiB" or "endless" (a device); "utf-8-sig" drops
    a spreadsheet's byte-order mark."""
    refuse = too_large or (lambda size: _over_limit(path, max_bytes, size))
    path = Path(path)
    refuse_pipe(path)
    with opening_errors(path, noun, kind), open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_bytes:  # refused before reading; a pipe or device reports 0 and is read bounded
            raise PipelineError(refuse(f"{size / 2**20:.0f} MiB"))
        raw = read_at_most(handle, max_bytes)
    if len(raw) > max_bytes:
        raise PipelineError(refuse("endless"))
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None


def _over_limit(path: Path, max_bytes: int, size: str) -> str:
    return f"{path}: {size}, over {max_bytes >> 20} MiB, too large for this file; is it the right one?"


def read_text(path: str | os.PathLike, max_bytes: int = MAX_SMALL_FILE_BYTES) -> str:
    """A UTF-8 text file (an id list, a log), every failure one PipelineError naming it."""
    return read_bounded_text(path, max_bytes)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object (every record this pipeline writes is one), or a one-line PipelineError."""
    text = read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise PipelineError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise PipelineError(f"{path}: expected a JSON object {{...}}, got {type(value).__name__}")
    return value


def _npy_header(handle, path, fix: str):
    """(shape, dtype, data offset) of an open .npy, checked against the file's size before any
    data is allocated (a damaged header can claim terabytes)."""
    import numpy as np

    version = np.lib.format.read_magic(handle)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
        np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(handle)
    data_start = handle.tell()
    size = os.fstat(handle.fileno()).st_size
    needed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if dtype.hasobject:
        raise PipelineError(f"{path}: holds Python objects, not numbers{fix}")
    if data_start + needed != size:
        raise PipelineError(f"{path}: header says {shape} {dtype} ({needed} bytes) but the file holds "
                            f"{size - data_start}: truncated or damaged{fix}")
    return shape, dtype, data_start, fortran


@contextmanager
def _npy_errors(path, fix: str):
    """Every way a .npy can fail to read, one PipelineError naming it."""
    with opening_errors(path, "file", "a .npy file", fix):
        try:
            yield
        except (ValueError, TypeError, SyntaxError, EOFError) as exc:  # a damaged header
            raise PipelineError(f"{path}: not a readable .npy array ({' '.join(str(exc).split())[:120]}){fix}") \
                from None


def read_npy(path: str | os.PathLike, hint: str = ""):
    """A .npy array, its header checked against the file size before the data is allocated (a
    damaged header can claim terabytes). hint: what to run when the file is bad ("" = nothing)."""
    import numpy as np

    fix = f" — {hint}" if hint else ""
    refuse_pipe(path)
    with _npy_errors(path, fix), open(path, "rb") as handle:
        _npy_header(handle, path, fix)
        handle.seek(0)
        return np.load(handle, allow_pickle=False)


def read_npy_shape(path: str | os.PathLike, hint: str = ""):
    """(shape, dtype) of a .npy from its header alone, checked as read_npy checks it."""
    fix = f" — {hint}" if hint else ""
    refuse_pipe(path)
    with _npy_errors(path, fix), open(path, "rb") as handle:
        shape, dtype, _, _ = _npy_header(handle, path, fix)
        return shape, dtype


def iter_npy_rows(path: str | os.PathLike, rows: int, hint: str = ""):
    """(start, array of up to `rows` rows) pieces of a C-order .npy, read a piece at a time: a
    367 MB prediction is added into a sum without a second full copy in memory."""
    import numpy as np

    fix = f" — {hint}" if hint else ""
    refuse_pipe(path)
    with _npy_errors(path, fix), open(path, "rb") as handle:
        shape, dtype, _, fortran = _npy_header(handle, path, fix)
        if fortran or not shape:
            raise PipelineError(f"{path}: expected a C-order array with rows{fix}")
        row_items = int(np.prod(shape[1:], dtype=np.int64))
        for start in range(0, shape[0], rows):
            count = min(rows, shape[0] - start)
            raw = handle.read(count * row_items * dtype.itemsize)
            if len(raw) != count * row_items * dtype.itemsize:
                raise PipelineError(f"{path}: ends early (changed while read){fix}")
            yield start, np.frombuffer(raw, dtype=dtype).reshape((count, *shape[1:]))


MAX_TABLE_BYTES = 64 << 20  # depths.csv, folds files, log.csv: TGS's 22000-row depths.csv is 0.4 MiB


def _check_size(path: str | os.PathLike, max_bytes: int) -> None:
    """Refuse a file over max_bytes before reading it (pandas would hold all of it, and more)."""
    refuse_pipe(path)
    size = os.stat(path).st_size
    if size > max_bytes:
        raise PipelineError(f"{path}: {size / 2**20:.0f} MiB, over the {max_bytes >> 20} MiB this file can "
                            "plausibly be; is it the right file?")


def read_csv_strings(path: str | os.PathLike, expected: str, max_bytes: int = MAX_TABLE_BYTES):
    """A CSV as a DataFrame of str columns ("" never becomes NaN); every read failure is one
    PipelineError naming the file. `expected` describes the header for the empty-file message."""
    import pandas as pd

    from pipeline.errors import one_line

    try:
        with warnings.catch_warnings():
            # A row with more fields than the header: pandas would silently take the first
            # column as the index (shifting every value one column) or, with index_col=False,
            # drop the extra fields with a ParserWarning; refuse the file instead.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            _check_size(path, max_bytes)
            # utf-8-sig: a spreadsheet's byte-order mark is not part of the first column's name
            return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", index_col=False)
    except pd.errors.ParserWarning:
        raise PipelineError(f"{path}: a row has more fields than the header {expected!r}") from None
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise PipelineError(f"{path}: is a folder, expected a CSV file") from None
    except UnicodeDecodeError:
        raise PipelineError(f"{path}: not UTF-8 text") from None
    except pd.errors.EmptyDataError:
        raise PipelineError(f"{path}: empty file, expected a header {expected!r}") from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise PipelineError(f"{path}: not a valid CSV ({one_line(exc)})") from None
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read ({exc.strerror or one_line(exc)})") from None
