"""Atomic writes: a file is either its old content or its complete new content.

Checkpoints, OOF arrays, CSVs and JSON are written to a temp file in the same
folder, fsynced, then `os.replace`d over the target, so a kill or a full disk
never leaves a half-written file where a reader expects a whole one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
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
    target = replaceable_target(path)
    make_dirs(target.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}-", suffix=TEMP_SUFFIX,
                                        dir=target.parent)
        os.fchmod(fd, _new_file_mode(target))  # mkstemp makes 0600
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


def replaceable_target(path: str | os.PathLike) -> Path:
    """The one place that decides what an atomic write may replace: a symlink is followed and its
    target written (the temp goes beside the resolved target, so the rename stays in one folder);
    a path that exists must be a regular file. A FIFO, device node, socket or folder is refused in
    one line before anything is written, so `--out /dev/full` or a pipe is never replaced."""
    target = Path(os.path.realpath(path))
    try:
        mode = os.stat(target).st_mode
    except (FileNotFoundError, NotADirectoryError):  # a new file; make_dirs names a file in the way
        return target
    except OSError as exc:
        raise PipelineError(f"{path}: could not write ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise PipelineError(f"{path}: is {_kind(mode)}, not a regular file; refusing to replace it "
                            "(name a file path for the output)")
    return target


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _new_file_mode(target: Path) -> int:
    # A replaced file keeps its mode; a new one follows the umask, like any Unix tool's output.
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return 0o666 & ~process_umask()


_umask: int | None = None


def process_umask() -> int:
    """The process umask, read once: from /proc where Linux shows it, else by setting it and
    setting it back at once (os.umask has no read-only form)."""
    global _umask
    if _umask is None:
        try:
            with open("/proc/self/status", encoding="ascii") as status:
                _umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
        except (OSError, StopIteration, ValueError, IndexError):
            _umask = os.umask(0o022)
            os.umask(_umask)
    return _umask


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
