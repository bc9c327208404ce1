"""Every command acting on a run appends what it prints, with times, to `runs/<name>/log.txt`.

`with run_log(run_dir, argv):` tees sys.stdout and sys.stderr: the console sees exactly what
it saw before, the file gets each finished line behind a timestamp, framed by the command
line and its exit. Progress bars redraw a line with carriage returns; only the line's last
state is kept, so the file holds what a reader of the console saw last, not every redraw.
The file is opened and closed per line (a few hundred lines a run): a run dir that appears
only during the command (train creates it) gets the lines printed before it existed, and
one removed under the command (--force) is simply written again.

Optional TensorBoard scalars (`run.tensorboard: true`) are written here too, from the same
per-epoch row that goes to fold<k>/log.csv; torch.utils.tensorboard is imported only then.
"""

from __future__ import annotations

import atexit
import math
import os
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.rundir import RunDir

TENSORBOARD_DIR = "tensorboard"


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def last_state(line: str) -> str:
    """What a terminal shows of a line written with carriage returns: its last redraw."""
    return line.rsplit("\r", 1)[-1].rstrip()


class RunLog:
    """Appends timestamped lines to `path`, holding them while its folder does not exist."""

    def __init__(self, path: Path):
        self.path = path
        self.held: list[str] = []
        self.exit_code: int | None = None  # set by the caller when the command returns one

    def write_line(self, text: str) -> None:
        self.held.append(f"{_stamp()}  {text}\n")
        if self.path.parent.is_dir():
            try:
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write("".join(self.held))
                self.held.clear()
            except OSError:
                pass  # a log that cannot be written must not stop the command it records


class _Tee:
    """A text stream that writes through to `stream` and sends finished lines to `log`."""

    def __init__(self, stream, log: RunLog):
        self._stream = stream
        self._log = log
        self._pending = ""

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        self._pending += text
        if "\n" in self._pending:
            *lines, self._pending = self._pending.split("\n")
            for line in lines:
                line = last_state(line)
                if line.strip():
                    self._log.write_line(line)
        return written

    def flush(self) -> None:
        self._stream.flush()

    def finish(self) -> None:
        line = last_state(self._pending)
        if line.strip():
            self._log.write_line(line)
        self._pending = ""

    def __getattr__(self, name):  # isatty, fileno, encoding, buffer...: the console's own
        return getattr(self._stream, name)


def is_secondary_process() -> bool:
    """A torchrun rank other than 0: rank 0 writes the run's files, this one too."""
    return int(os.environ.get("RANK", "0")) != 0


@contextmanager
def run_log(run_dir: str | os.PathLike, argv: list[str] | None = None):
    """Tee stdout and stderr to runs/<name>/log.txt for the duration of the block."""
    if is_secondary_process():
        yield None
        return
    log = RunLog(RunDir(Path(run_dir)).log)
    command = "tgs " + shlex.join(sys.argv[1:] if argv is None else argv)
    log.write_line(f"$ {command}")
    out, err = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    started = time.perf_counter()
    outcome = "failed"
    try:
        yield log
        outcome = f"exit {log.exit_code or 0}"
    except SystemExit as exc:
        outcome = f"exit {exc.code}"
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as errors.Terminated ("terminated (SIGTERM)")
        outcome = str(exc) or "interrupted"
        raise
    except BaseException as exc:
        outcome = f"failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        raise
    finally:
        out.finish()
        err.finish()
        sys.stdout, sys.stderr = saved
        log.write_line(f"{outcome} after {time.perf_counter() - started:.1f} s")


# ---------------------------------------------------------------- TensorBoard (optional)

_writers: dict[Path, object] = {}


def _writer(log_dir: Path):
    writer = _writers.get(log_dir)
    if writer is None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            from pipeline.errors import PipelineError

            raise PipelineError("run.tensorboard: the tensorboard package is not installed "
                                "(pip install -e '.[tensorboard]')") from None
        if not _writers:
            atexit.register(close_tensorboard)
        writer = _writers[log_dir] = SummaryWriter(log_dir=str(log_dir))
    return writer


def tensorboard_epoch(cfg, fold: int, row: dict) -> None:
    """Scalars of one epoch (a fold/log.csv row) under runs/<name>/tensorboard/fold<k>/,
    when the config asks for them: loss/train, loss/val, score/val, lr."""
    if not cfg.run.tensorboard:
        return
    writer = _writer(Path(cfg.run_dir) / TENSORBOARD_DIR / f"fold{fold}")
    step = int(row["epoch"])
    for tag, key in (("loss/train", "train_loss"), ("loss/val", "val_loss"), ("score/val", "val_score"),
                     ("score/val_raw_weights", "val_score_raw"), ("lr", "lr")):
        try:
            value = float(row.get(key, ""))
        except ValueError:
            continue
        if not math.isnan(value):
            writer.add_scalar(tag, value, step)
    writer.flush()


def close_tensorboard() -> None:
    for writer in _writers.values():
        writer.close()
    _writers.clear()
