"""Submitting a CSV to the competition, checked first so Kaggle never scores a broken file."""

from __future__ import annotations

import os

from pipeline.errors import PipelineError
from pipeline.kaggle import COMPETITION
from pipeline.kaggle.credentials import run_kaggle


def validate_csv(csv: str | os.PathLike) -> int:
    """Header, ids and every RLE of a submission (without a test folder to compare ids to)."""
    from pipeline.rle import decode_many, read_rle_csv

    table = read_rle_csv(csv)
    if table.empty:
        raise PipelineError(f"{csv}: no rows")
    decode_many(table["rle_mask"].tolist(), (101, 101), ids=table["id"].tolist(), where=str(csv))
    return len(table)


def submit(csv: str | os.PathLike, message: str, test: str | os.PathLike | None = None) -> None:
    if test is not None:
        from pipeline.submit import check_submission

        rows = check_submission(csv, test)
        print(f"{csv}: valid submission, {rows} rows (checked against {test})")
    else:
        rows = validate_csv(csv)
        print(f"{csv}: {rows} rows, header and RLE valid (give --test DATA to check the ids too)")
    if not message.strip():
        raise PipelineError("-m/--message: empty; Kaggle needs a submission description")
    run_kaggle(["competitions", "submit", COMPETITION, "-f", str(csv), "-m", message])

