"""Run a pipeline command that SIGKILLs itself at a write boundary:

    python -m tests.kill_at_write N before|after COMMAND ARGS...

Every file the pipeline writes lands by `os.replace` (fileio's atomic writes; train's
last.pt -> prev.pt move), so the N-th replace is the N-th write boundary: `before` dies with the
temp file written and the target untouched, `after` with the target replaced and nothing after
it written. A process that never reaches the N-th replace exits normally (its own exit code).
"""

from __future__ import annotations

import os
import signal
import sys


def arm(n: int, when: str) -> None:
    real_replace = os.replace
    seen = {"count": 0}

    def replace(src, dst, *args, **kwargs):
        seen["count"] += 1
        if seen["count"] == n and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst, *args, **kwargs)
        if seen["count"] == n and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace


if __name__ == "__main__":
    count, moment, *command = sys.argv[1:]
    assert moment in ("before", "after"), moment
    arm(int(count), moment)
    from pipeline.cli import main

    sys.exit(main(command))
