"""An exclusive advisory lock on a file, naming its holder: two runs never share a run dir
(or the leaderboard) silently."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from pipeline.errors import PipelineError
from pipeline.fileio.atomic import make_dirs


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
