"""Speed and quality benchmarks, run as scripts (`python -m benchmarks`, `python -m benchmarks.scale`, ...),
never as timed tests. Each writes its figures to benchmarks/results/ through `save_result`."""

from __future__ import annotations

import datetime
import socket
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def save_result(kind: str, result: dict, device: str = "", out: Path | None = None) -> Path:
    """Write `result` atomically to benchmarks/results/<kind>-<host>-<date>[-<device>].json (or
    `out`), say where, and return the path."""
    from pipeline.fileio import write_json

    if out is None:
        parts = [kind, socket.gethostname(), datetime.date.today().isoformat()] + ([device.split(":")[0]] if device else [])
        out = RESULTS / ("-".join(p for p in parts if p) + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"wrote {out}")
    return out
