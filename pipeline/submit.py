"""Submission: the tuned post-processing (pipeline/postprocess.py) of the test probabilities ->
RLE CSV, checked before it leaves.

`submit_run` reads what `tune` decided (`tune.json`) and what `predict` produced
(`test_probs.npy` + `test_ids.txt`, named by `predict.json`), both checked to be whole and made
from the run's finished folds as they are now (pipeline/manifests.py); it writes
`submissions/<run>.csv` atomically and runs `check_submission` on the written file, so a file
that Kaggle would reject (missing ids, bad RLE, wrong header) never sits in submissions/
looking finished.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.rundir import RunDir

SUBMISSIONS_DIR = Path("submissions")


def _require(path: Path, command: str) -> Path:
    if not path.exists():
        raise PipelineError(f"{path}: missing — run `{command}`")
    return path


def read_test_probs(run: Path) -> tuple[list[str], np.ndarray]:
    """predict's output: test ids and [N,101,101] probabilities as stored (float16), checked to agree
    with each other and to be the files predict.json names (one unit: a kill between predict's
    writes leaves files that predict.json does not name)."""
    from pipeline.fileio import read_npy, read_text
    from pipeline.manifests import read_predict_meta

    predict = f"python -m pipeline predict --run {run}"
    probs_path = _require(RunDir(run).probs, predict)
    ids_path = _require(RunDir(run).ids, predict)
    probs = read_npy(probs_path, hint=f"run `{predict}`")
    ids = read_text(ids_path).split()
    if probs.ndim != 3 or probs.shape[1:] != (101, 101) or len(probs) != len(ids):
        raise PipelineError(
            f"{probs_path}: shape {probs.shape} does not match {len(ids)} ids in {ids_path.name} — run `{predict}`"
        )
    if len(set(ids)) != len(ids):
        raise PipelineError(f"{ids_path}: {len(ids) - len(set(ids))} duplicate ids — run `{predict}`")
    if not np.issubdtype(probs.dtype, np.floating):
        raise PipelineError(f"{probs_path}: holds {probs.dtype}, expected float probabilities — run `{predict}`")
    read_predict_meta(run)  # last: a damaged file is named first, then whether predict.json names it
    return ids, probs


def _blank_test_images(data_dir: Path, ids: list[str]) -> np.ndarray:
    from pipeline.data import is_blank, read_images

    images = read_images([data_dir / "test" / "images" / f"{i}.png" for i in ids])
    return np.asarray(is_blank(images), dtype=bool)


def submit_run(run_dir: str | Path, out: str | Path | None = None, data_dir: str | Path | None = None) -> Path:
    """Write the run's submission (default submissions/<run name>.csv), checked; returns its path."""
    from pipeline.data import list_image_ids
    from pipeline.rle import encode_many, write_rle_csv
    from pipeline.fileio import read_json
    from pipeline.postprocess import read_tuned
    from pipeline.manifests import (check_blend_finished, check_predictions_current, check_tune_current,
                                    read_predict_meta)
    from pipeline.rundir import load_run_config

    run = Path(run_dir)
    check_blend_finished(run)  # a blend killed part-way: its command, not the stages it bypasses
    cfg = load_run_config(run)
    post = read_tuned(run)
    ids, probs = read_test_probs(run)
    # both made from the folds as they are now: after a retrain (even one killed mid-way) the
    # old rule and the old predictions are refused, never submitted
    data = Path(data_dir if data_dir is not None else cfg.data)
    check_tune_current(cfg, run, read_json(RunDir(run).tune))
    images_dir = data / "test" / "images"
    if not images_dir.is_dir():
        raise PipelineError(f"{images_dir}: no test images folder — give --data DIR in the Kaggle layout")
    expected = list_image_ids(images_dir)
    if set(expected) != set(ids):
        missing = sorted(set(expected) - set(ids))
        extra = sorted(set(ids) - set(expected))
        example = f"{missing[0]} not predicted" if missing else f"{extra[0]} not in {images_dir}"
        raise PipelineError(
            f"{RunDir(run).ids}: {len(missing) + len(extra)} ids differ from {images_dir} (e.g. {example}) "
            f"— run `python -m pipeline predict --run {run} --data {data}`"
        )
    # the same ids may name other pixels (swapped or rewritten images, another dataset)
    check_predictions_current(cfg, run, read_predict_meta(run), data)

    empty = _blank_test_images(data, ids) if post.empty_blank else None
    masks = post.apply(probs, blank=empty)
    path = Path(out) if out is not None else SUBMISSIONS_DIR / f"{cfg.name}.csv"
    write_rle_csv(path, ids, encode_many(masks))
    rows = check_submission(path, data)
    empties = int((~masks.any(axis=(1, 2))).sum())
    print(f"{path}: {rows} rows, {post.describe()}, "
          f"{empties} empty masks ({empties / max(rows, 1):.0%})"
          + (f", {int(empty.sum())} blank images forced empty" if empty is not None else ""))
    return path


# ---------------------------------------------------------------- checking a submission


def _test_images_dir(test: Path) -> tuple[Path, Path | None]:
    """(test images folder, dataset folder or None) from a dataset folder or the images folder."""
    if (test / "test" / "images").is_dir():
        return test / "test" / "images", test
    if test.is_dir():
        dataset = test.parent.parent if (test.name == "images" and test.parent.name == "test") else None
        return test, dataset
    raise PipelineError(f"{test}: no such test folder (give the dataset folder or its test/images)")


def check_submission(csv: str | Path, test: str | Path) -> int:
    """Validate a submission against the test images; returns its row count.

    Problems (bad header, duplicate/missing/extra ids, malformed RLE, ids that differ from
    sample_submission.csv) raise a one-line PipelineError naming the file and the first problem.
    """
    from pipeline.data import list_image_ids
    from pipeline.rle import check_many, read_rle_csv

    csv = Path(csv)
    images_dir, dataset = _test_images_dir(Path(test))
    frame = read_rle_csv(csv)  # header, encoding, duplicate and empty ids
    ids = frame["id"].tolist()
    expected = list_image_ids(images_dir)
    if not expected:
        raise PipelineError(f"{images_dir}: no test images to check {csv} against")
    missing = sorted(set(expected) - set(ids))
    if missing:
        raise PipelineError(f"{csv}: {len(missing)} test images of {images_dir} have no row (e.g. {missing[0]})")
    extra = sorted(set(ids) - set(expected))
    if extra:
        raise PipelineError(f"{csv}: {len(extra)} ids are not images in {images_dir} (e.g. {extra[0]})")
    sample = dataset / "sample_submission.csv" if dataset is not None else None
    if sample is not None and sample.is_file():
        sample_ids = set(read_rle_csv(sample)["id"].tolist())
        differ = sorted(sample_ids.symmetric_difference(ids))
        if differ:
            raise PipelineError(f"{csv}: {len(differ)} ids differ from {sample} (e.g. {differ[0]})")

    rles = frame["rle_mask"].tolist()
    try:
        check_many(rles, (101, 101), ids=ids, where=str(csv))  # vectorised, no masks kept; stops at the first bad row
    except PipelineError as first:
        n_bad = sum(1 for image_id, rle in zip(ids, rles) if not _decodes(rle, image_id))
        more = f" (and {n_bad - 1} more bad rows)" if n_bad > 1 else ""
        raise PipelineError(f"{first}{more}") from None
    return len(ids)


def _decodes(rle: str, image_id: str) -> bool:
    from pipeline.rle import decode

    try:
        decode(rle, (101, 101), where=image_id)
    except PipelineError:
        return False
    return True
