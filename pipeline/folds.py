"""K-fold split stratified by salt coverage, kept as a file so every run validates alike.

Coverage class (the stratum): 0 for an empty mask, else 1 + floor(10 * coverage)
clipped to 1..10, so class 1 is "some salt, under 10%", class 2 is 10-20%, ...,
class 10 is 90-100% (whole-image salt included). Empty masks get a class of their own
because the metric scores them all-or-nothing: each fold must hold its share of them.

The folds file (`folds/<data>-k<k>-s<seed>.csv`) has columns id, fold, coverage_class,
sorted by id. The assignment depends only on the set of ids, their masks, k and the
seed, never on the order the ids were listed in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.fileio import read_csv_strings

N_COVERAGE_CLASSES = 11  # 0 = empty, 1..10 = coverage deciles
FOLD_COLUMNS = ["id", "fold", "coverage_class"]


def coverage_class(masks: np.ndarray) -> np.ndarray:
    """int [N]: 0 when the mask is empty, else 1 + floor(10 * coverage) clipped to 1..10."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"expected masks [N,H,W], got shape {masks.shape}")
    salt_pixels = (masks != 0).reshape(len(masks), -1).sum(axis=1)
    n_pixels = masks.shape[1] * masks.shape[2]
    # Integer arithmetic: floor(10 * pixels / total) without float rounding at decile edges.
    decile = (10 * salt_pixels) // max(n_pixels, 1)
    return np.where(salt_pixels == 0, 0, np.clip(1 + decile, 1, 10)).astype(np.int64)


def _merge_small_strata(classes: np.ndarray, k: int) -> np.ndarray:
    """Strata with at least k members each: a class with fewer joins its next neighbour.

    StratifiedKFold warns (and leaves folds without that class) when a stratum has fewer
    members than folds; merging neighbouring coverage classes keeps the split stratified
    on what it can be. Classes are walked upwards and merged into the next one until the
    group is big enough; a small last group joins the one before it.
    """
    labels, counts = np.unique(classes, return_counts=True)
    groups: list[list[int]] = []
    current: list[int] = []
    size = 0
    for label, count in zip(labels.tolist(), counts.tolist()):
        current.append(label)
        size += count
        if size >= k:
            groups.append(current)
            current, size = [], 0
    if current:
        if groups:
            groups[-1].extend(current)
        else:
            groups.append(current)
    stratum_of_class = {label: index for index, group in enumerate(groups) for label in group}
    return np.array([stratum_of_class[c] for c in classes.tolist()], dtype=np.int64)


def make_folds(ids: Sequence[str], masks: np.ndarray, k: int = 5, seed: int = 42) -> pd.DataFrame:
    """Assign each id a fold 0..k-1 with sklearn's StratifiedKFold on its coverage class.

    Returns a DataFrame [id, fold, coverage_class] sorted by id; the same ids, masks, k
    and seed always give the same folds.
    """
    from sklearn.model_selection import StratifiedKFold

    ids = [str(i) for i in ids]
    if len(ids) != len(masks):
        raise ValueError(f"make_folds got {len(ids)} ids but {len(masks)} masks")
    if len(set(ids)) != len(ids):
        raise PipelineError(f"make_folds: id {_first_duplicate(ids)} appears more than once")
    if k < 2:
        raise PipelineError(f"folds: k must be at least 2, got {k}")
    if not 0 <= seed <= 2**32 - 1:  # sklearn's own check is a ValueError traceback
        raise PipelineError(f"folds: seed must be in 0..{2**32 - 1}, got {seed}")
    if len(ids) < k:
        raise PipelineError(f"folds: k={k} folds need at least {k} train images, got {len(ids)}")
    order = np.argsort(np.array(ids, dtype=object), kind="stable")  # input order must not matter
    sorted_ids = [ids[i] for i in order]
    classes = coverage_class(np.asarray(masks)[order])
    strata = _merge_small_strata(classes, k)
    folds = np.empty(len(ids), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, val_index) in enumerate(splitter.split(np.zeros(len(ids)), strata)):
        folds[val_index] = fold
    return pd.DataFrame({"id": pd.Series(sorted_ids, dtype=str), "fold": folds, "coverage_class": classes})


def _first_duplicate(ids: Sequence[str]) -> str:
    seen: set[str] = set()
    for image_id in ids:
        if image_id in seen:
            return image_id
        seen.add(image_id)
    return ""


def _train_ids_and_masks(data_dir: Path, k: int) -> tuple[list[str], np.ndarray]:
    """Train ids and masks: from train/masks PNGs, or from train.csv when there are none (then a
    train.csv of fewer than k rows is named as what is short, not the train images)."""
    from pipeline import data

    images_dir, masks_dir, csv_path = data_dir / "train" / "images", data_dir / "train" / "masks", data_dir / "train.csv"
    if masks_dir.is_dir() or data._exists_but_not_folder(masks_dir):
        # the ids are the images' (what training loads); every one needs its mask
        ids = data.list_image_ids(images_dir) if images_dir.is_dir() else data.list_image_ids(masks_dir)
        if not ids:
            raise PipelineError(f"{images_dir if images_dir.is_dir() else masks_dir}: no .png files to make folds from")
        mask_ids = set(data.list_image_ids(masks_dir))
        missing = [i for i in ids if i not in mask_ids]
        if missing:
            raise PipelineError(f"{masks_dir / (missing[0] + '.png')}: missing mask for image {missing[0]}"
                                + (f" ({len(missing) - 1} more images have no mask)" if len(missing) > 1 else ""))
        return ids, data.read_masks([masks_dir / f"{i}.png" for i in ids])
    if csv_path.exists():
        from pipeline.rle import decode_many, read_rle_csv

        table = read_rle_csv(csv_path)
        if table.empty:
            raise PipelineError(f"{csv_path}: no rows to make folds from")
        if len(table) < k:
            raise PipelineError(f"{csv_path}: {len(table)} row{'s' if len(table) > 1 else ''}, too few for k={k} "
                                f"folds (at least {k} needed, one per fold): is the file complete? Or use fewer "
                                "folds (`folds --k`, a config's n_folds)")
        ids = table["id"].tolist()
        return ids, decode_many(table["rle_mask"].tolist(), ids=ids, where=str(csv_path))
    raise PipelineError(f"{data_dir}: no train/masks folder or train.csv to make folds from")


def make_folds_for_dir(data_dir: str | os.PathLike, k: int = 5, seed: int = 42,
                       out: str | os.PathLike | None = None) -> pd.DataFrame:
    """make_folds over a dataset folder's train masks; writes `out` atomically and returns it."""
    from pipeline.fileio import write_csv

    ids, masks = _train_ids_and_masks(Path(data_dir), k)
    folds = make_folds(ids, masks, k=k, seed=seed)
    write_csv(out, folds)
    return folds


def load_folds(path: str | os.PathLike, ids: Sequence[str] | None = None) -> pd.DataFrame:
    """The folds file as a DataFrame [id, fold(, coverage_class)], validated.

    PipelineError when the file is missing or unreadable, lacks the id/fold columns,
    holds a fold that is not a non-negative integer or an id twice, or (given `ids`)
    leaves some of them without a fold.
    """
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: folds file not found (make it with `python -m pipeline folds`)")
    table = read_csv_strings(path, ",".join(FOLD_COLUMNS))
    missing_columns = [column for column in ("id", "fold") if column not in table.columns]
    if missing_columns:
        raise PipelineError(f"{path}: columns are {','.join(map(str, table.columns))!r}, "
                            f"expected {','.join(FOLD_COLUMNS)} (no {missing_columns[0]!r} column)")
    if (table["id"] == "").any():
        raise PipelineError(f"{path}: line {int(np.flatnonzero(table['id'] == '')[0]) + 2} has an empty id")
    spaced = table["id"].str.contains(r"\s", regex=True).to_numpy(dtype=bool)
    if spaced.any():  # ids are written and read split on whitespace (oof_ids.txt, test_ids.txt)
        raise PipelineError(f"{path}: line {int(np.flatnonzero(spaced)[0]) + 2}: id "
                            f"{table['id'].iloc[int(np.flatnonzero(spaced)[0])]!r} holds whitespace")
    if table["id"].duplicated().any():
        raise PipelineError(f"{path}: id {table['id'][table['id'].duplicated()].iloc[0]} appears more than once")
    table["fold"] = _non_negative_ints(table, "fold", path)
    if "coverage_class" in table.columns:
        table["coverage_class"] = _non_negative_ints(table, "coverage_class", path)
    if ids is not None:
        known = set(table["id"].tolist())
        missing = [i for i in ids if i not in known]
        if missing:
            raise PipelineError(f"{path}: {len(missing)} train ids have no fold (e.g. {missing[0]}); "
                                "the folds file is for another dataset: delete it to make new folds")
    return table


def _non_negative_ints(table: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    text = table[column].str.strip()
    valid = text.str.fullmatch(r"[0-9]+").to_numpy(dtype=bool)
    if not valid.all():
        row = int(np.flatnonzero(~valid)[0])
        raise PipelineError(f"{path}: id {table['id'].iloc[row]} has {column} {table[column].iloc[row]!r}, "
                            "expected a non-negative integer")
    # more than 18 digits would overflow int64 in astype (an OverflowError, not a message)
    too_long = (text.str.lstrip("0").str.len() > 18).to_numpy(dtype=bool)
    if too_long.any():
        row = int(np.flatnonzero(too_long)[0])
        raise PipelineError(f"{path}: id {table['id'].iloc[row]} has {column} {table[column].iloc[row]!r}, "
                            "far too large")
    return text.astype(np.int64).to_numpy()


def fold_summary(folds_df: pd.DataFrame) -> str:
    """A small table: per fold the image count, share of empty masks and mean coverage class."""
    classes = folds_df["coverage_class"] if "coverage_class" in folds_df.columns else None
    lines = [f"{'fold':>4}  {'images':>6}  {'empty':>6}  {'mean class':>10}"]

    def row(name: str, rows: pd.DataFrame) -> str:
        if classes is None:
            return f"{name:>4}  {len(rows):>6}  {'-':>6}  {'-':>10}"
        fold_classes = rows["coverage_class"]
        empty = float((fold_classes == 0).mean()) if len(rows) else 0.0
        mean_class = float(fold_classes.mean()) if len(rows) else 0.0
        return f"{name:>4}  {len(rows):>6}  {empty:>6.1%}  {mean_class:>10.2f}"

    for fold, rows in folds_df.groupby("fold", sort=True):
        lines.append(row(str(fold), rows))
    lines.append(row("all", folds_df))
    return "\n".join(lines)
