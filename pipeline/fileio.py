"""Atomic writes: a file is either its old content or its complete new content.

Checkpoints, OOF arrays, CSVs and JSON are written to a temp file in the same
folder, fsynced, then `os.replace`d over the target, so a kill or a full disk
never leaves a half-written file where a reader expects a whole one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from pipeline.errors import PipelineError


# atomic_open's temp files are ".<target name>.<writer pid>-<random>.tmp" beside the target: the
# pid tells a temp that a killed writer left (SIGKILL runs no cleanup) from one being written now.
TEMP_SUFFIX = ".tmp"
_TEMP_PID = re.compile(r"\.(\d+)-[^.]*" + re.escape(TEMP_SUFFIX) + "$")
_swept: set[Path] = set()  # folders whose dead writers' temps this process has removed


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `path`; on clean exit fsync and rename it onto `path`. The first
    successful write of a process into a folder removes the temps that killed writers left there."""
    target = Path(path)
    make_dirs(target.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}-", suffix=TEMP_SUFFIX,
                                        dir=target.parent)
    except OSError as exc:  # a read-only or full disk, permissions
        raise PipelineError(f"{target}: could not write ({exc.strerror or exc})") from exc
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except OSError as exc:
        _remove_quietly(tmp_name)
        raise PipelineError(f"{target}: could not write ({exc.strerror or exc})") from exc
    except BaseException:
        _remove_quietly(tmp_name)
        raise
    _fsync_dir(target.parent)
    folder = target.parent.resolve()
    if folder not in _swept:  # once per folder and process: a folder of 20000 masks is listed once
        _swept.add(folder)
        remove_dead_writers_temp_files(folder)


def remove_dead_writers_temp_files(folder: str | os.PathLike) -> None:
    """Remove the temps in `folder` whose writer process is gone (a temp of a live writer, this
    process's own included, stays; one named before temps carried a pid is left to
    `remove_stale_temp_files`)."""
    for stale in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        found = _TEMP_PID.search(stale.name)
        if found and not _process_alive(int(found.group(1))):
            with contextlib.suppress(OSError):
                stale.unlink()


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: a process of another user holds that pid
        return True
    return True


def make_dirs(folder: str | os.PathLike) -> Path:
    """mkdir -p, with a one-line PipelineError naming the folder (a file in the way, permissions,
    a full disk) instead of an OSError traceback."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise PipelineError(f"{folder}: cannot make this folder, a file of that name is in the way") from None
    except OSError as exc:
        raise PipelineError(f"{folder}: cannot make this folder ({exc.strerror or exc})") from None
    return folder


def remove_stale_temp_files(folder: str | os.PathLike) -> None:
    """Remove the temp files that atomic writes killed mid-way (SIGKILL runs no cleanup) left in
    `folder`. Only for a folder no live writer uses, e.g. one whose lock the caller holds."""
    for stale in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        stale.unlink(missing_ok=True)


def _remove_quietly(name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every filesystem allows it, which is fine.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    # numpy scalars and paths show up in metrics and configs
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_csv(path: str | os.PathLike, frame) -> None:
    """Write a pandas DataFrame atomically, without the index."""
    with atomic_open(path, "w") as handle:
        frame.to_csv(handle, index=False, lineterminator="\n")


def write_npy(path: str | os.PathLike, array) -> None:
    import numpy as np

    with atomic_open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def write_with(path: str | os.PathLike, writer: Callable[[IO], None]) -> None:
    """Atomically write whatever `writer(handle)` writes (e.g. `torch.save`)."""
    with atomic_open(path, "wb") as handle:
        recorder = _WriteErrorRecorder(handle)
        try:
            writer(recorder)
        except OSError:
            raise
        except Exception:
            # torch.save reports a failed write (disk full) as a RuntimeError from its C++
            # writer; the OSError underneath is what the user can act on.
            if recorder.error is not None:
                raise recorder.error from None
            raise


class _WriteErrorRecorder:
    """A file handle that remembers the OSError its write raised (all else passes through)."""

    def __init__(self, handle: IO):
        self._handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


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


MAX_SMALL_FILE_BYTES = 64 << 20  # JSON records and id lists of a run: a few KB to ~1 MB


def read_bounded_text(path: str | os.PathLike, max_bytes: int, *, noun: str = "file", kind: str = "a file",
                      too_large: Callable[[str], str] | None = None, encoding: str = "utf-8") -> str:
    """A text file of at most max_bytes, every failure one PipelineError naming it: the one
    reader behind configs, run records and RLE CSVs. noun / kind name the file in the messages
    ("config file not found", "is a folder, expected a YAML config file"); too_large(size) words
    the refusal of a longer file, size being "130 MiB" or "endless" (a device); "utf-8-sig" drops
    a spreadsheet's byte-order mark."""
    refuse = too_large or (lambda size: _over_limit(path, max_bytes, size))
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:  # refused before reading; a pipe or device reports 0 and is read bounded
                raise PipelineError(refuse(f"{size / 2**20:.0f} MiB"))
            raw = read_at_most(handle, max_bytes)
    except FileNotFoundError:
        raise PipelineError(f"{path}: {noun} not found") from None
    except IsADirectoryError:
        raise PipelineError(f"{path}: is a folder, expected {kind}") from None
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read ({exc.strerror or exc})") from None
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


def read_npy(path: str | os.PathLike, hint: str = ""):
    """A .npy array, its header checked against the file size before the data is allocated (a
    damaged header can claim terabytes). hint: what to run when the file is bad ("" = nothing)."""
    import numpy as np

    fix = f" — {hint}" if hint else ""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(handle)
            data_start = handle.tell()
            size = os.fstat(handle.fileno()).st_size
            needed = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if dtype.hasobject:
                raise PipelineError(f"{path}: holds Python objects, not numbers{fix}")
            if data_start + needed != size:
                raise PipelineError(f"{path}: header says {shape} {dtype} ({needed} bytes) but the file holds "
                                    f"{size - data_start}: truncated or damaged{fix}")
            handle.seek(0)
            return np.load(handle, allow_pickle=False)
    except PipelineError:
        raise
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found{fix}") from None
    except IsADirectoryError:
        raise PipelineError(f"{path}: is a folder, expected a .npy file{fix}") from None
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read ({exc.strerror or exc}){fix}") from None
    except (ValueError, TypeError, SyntaxError, EOFError) as exc:  # a damaged header
        raise PipelineError(f"{path}: not a readable .npy array ({' '.join(str(exc).split())[:120]}){fix}") from None


MAX_TABLE_BYTES = 64 << 20  # depths.csv, folds files, log.csv: TGS's 22000-row depths.csv is 0.4 MiB


def _check_size(path: str | os.PathLike, max_bytes: int) -> None:
    """Refuse a file over max_bytes before reading it (pandas would hold all of it, and more)."""
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


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, blocking: bool = True, what: str = "") -> Iterator[None]:
    """An exclusive advisory lock (fcntl) on `path`; the holder's pid is written inside.

    blocking=False raises PipelineError naming the holder instead of waiting: two
    training runs must never share a run dir silently.
    """
    import fcntl

    lock_path = Path(path)
    make_dirs(lock_path.parent)
    try:
        handle = open(lock_path, "a+", encoding="utf-8")
    except OSError as exc:
        raise PipelineError(f"{lock_path}: cannot open the lock file ({exc.strerror or exc})") from None
    try:
        flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(handle.fileno(), flags)
        except BlockingIOError as exc:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise PipelineError(f"{lock_path}: {what or 'locked'} is in use by {holder}") from exc
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}\n")
            handle.flush()
        except OSError as exc:
            raise PipelineError(f"{lock_path}: cannot write the lock holder ({exc.strerror or exc})") from None
        yield
    finally:
        with contextlib.suppress(OSError):  # closing flushes: a full disk must not turn into a traceback
            handle.close()
